//! An OTLP/gRPC trace receiver run by the test: processes export their spans to it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`), and the test reads every byte they exported — span names,
//! attributes, span events and their attributes, links, resources — or the decoded spans.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Default)]
struct Received {
    requests: Vec<ExportTraceServiceRequest>,
}

#[derive(Clone, Default)]
struct Service {
    received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.received
            .lock()
            .expect("otlp receiver")
            .requests
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    endpoint: String,
    service: Service,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1:0 (plain gRPC, as the OTLP exporter's `http://` endpoint).
    ///
    /// # Errors
    /// When it cannot listen.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let service = Service::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Ok(Self {
            endpoint,
            service,
            task,
        })
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every export request received so far, protobuf-encoded as it came over the wire.
    pub fn raw(&self) -> Vec<u8> {
        let received = self.service.received.lock().expect("otlp receiver");
        let mut out = Vec::new();
        for r in &received.requests {
            out.extend_from_slice(&prost::Message::encode_to_vec(r));
        }
        out
    }

    /// Every span received so far, with the `service.name` of its resource.
    pub fn spans(&self) -> Vec<(String, Span)> {
        let received = self.service.received.lock().expect("otlp receiver");
        let mut out = Vec::new();
        for r in &received.requests {
            for rs in &r.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .map(|v| format!("{:?}", v.value))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((service.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

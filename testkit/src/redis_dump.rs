//! Everything a Redis server holds, for tests that look for secrets in it.

use anyhow::bail;

/// Every byte Redis holds: keys and values of every type, streams included.
///
/// # Errors
/// On Redis errors.
pub async fn dump_redis(url: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let client = redis::Client::open(url)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await?;
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut c).await?;
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query_async(&mut c).await?,
            "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut c).await?,
            "list" => {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await?
            }
            "set" => redis::cmd("SMEMBERS").arg(&key).query_async(&mut c).await?,
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await?
            }
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut c)
                    .await?
            }
            // Expired or deleted since KEYS listed it (e.g. a rate limiter's short-lived key).
            "none" => continue,
            other => bail!("unexpected redis type {other} for {key}"),
        };
        let mut bytes = Vec::new();
        flatten(&value, &mut bytes);
        out.push((key, bytes));
    }
    Ok(out)
}

fn flatten(v: &redis::Value, out: &mut Vec<u8>) {
    match v {
        redis::Value::BulkString(b) => {
            out.extend_from_slice(b);
            out.push(0);
        }
        redis::Value::SimpleString(s) => {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().for_each(|i| flatten(i, out));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
}

/// Whether `haystack` holds `needle` as UTF-8 or UTF-16LE.
pub fn contains_secret(haystack: &[u8], needle: &str) -> bool {
    let utf8 = needle.as_bytes();
    let utf16: Vec<u8> = needle.encode_utf16().flat_map(u16::to_le_bytes).collect();
    [utf8, utf16.as_slice()]
        .iter()
        .any(|n| !n.is_empty() && haystack.windows(n.len()).any(|w| w == *n))
}

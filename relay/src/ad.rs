//! Facts of Active Directory's wire format that both the agent and the test kit read: the
//! attribute ids of the attributes a writeback touches, and their per-attribute write
//! version in `replPropertyMetaData`, which AD increments on every originating write.

/// `unicodePwd` (the password).
pub const ATTID_UNICODE_PWD: u32 = 0x0009_005a;
/// `pwdLastSet`.
pub const ATTID_PWD_LAST_SET: u32 = 0x0009_0060;
/// `lockoutTime`.
pub const ATTID_LOCKOUT_TIME: u32 = 0x0009_0296;

/// A `replPropertyMetaData` value that is not a version-1 metadata vector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replPropertyMetaData: {0}")]
pub struct MetaError(String);

/// The version of attribute `attid` in a `replPropertyMetaDataBlob` (MS-DRSR 5.160): a 16-byte
/// header (version 1, reserved, count, reserved) then `count` entries of 48 bytes, each
/// starting with the attribute id and its version. `None` when the attribute was never
/// written.
///
/// # Errors
/// When the blob is not a version-1 metadata vector.
pub fn meta_version(blob: &[u8], attid: u32) -> Result<Option<u32>, MetaError> {
    let word = |at: usize| -> Result<u32, MetaError> {
        let bytes = blob
            .get(at..at + 4)
            .ok_or_else(|| MetaError(format!("truncated at byte {at}")))?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    };
    if word(0)? != 1 {
        return Err(MetaError(format!("version {} is not 1", word(0)?)));
    }
    let count = word(8)? as usize;
    if blob.len() != 16 + count * 48 {
        return Err(MetaError(format!(
            "{} bytes for {count} entries",
            blob.len()
        )));
    }
    for i in 0..count {
        let at = 16 + i * 48;
        if word(at)? == attid {
            return Ok(Some(word(at + 4)?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(entries: &[(u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[0] = 1;
        b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (attid, version) in entries {
            let mut e = vec![0u8; 48];
            e[0..4].copy_from_slice(&attid.to_le_bytes());
            e[4..8].copy_from_slice(&version.to_le_bytes());
            b.extend(e);
        }
        b
    }

    #[test]
    fn reads_the_version_of_one_attribute() {
        let b = blob(&[(ATTID_PWD_LAST_SET, 3), (ATTID_UNICODE_PWD, 7)]);
        assert_eq!(meta_version(&b, ATTID_UNICODE_PWD), Ok(Some(7)));
        assert_eq!(meta_version(&b, ATTID_LOCKOUT_TIME), Ok(None));
    }

    #[test]
    fn refuses_what_is_not_a_metadata_vector() {
        let mut b = blob(&[(ATTID_UNICODE_PWD, 7)]);
        b.pop();
        assert!(meta_version(&b, ATTID_UNICODE_PWD).is_err());
        assert!(meta_version(&[2, 0, 0, 0], ATTID_UNICODE_PWD).is_err());
        assert!(meta_version(&[], ATTID_UNICODE_PWD).is_err());
    }
}

//! Just enough of Windows security descriptors (MS-DTYP 2.4.6, self-relative form) to tell
//! whether a DACL grants the writeback rights: ACE types, flags, masks, object GUIDs, SIDs.

/// SE_DACL_PROTECTED: the object does not inherit ACEs from its parent.
pub const SE_DACL_PROTECTED: u16 = 0x1000;

/// ACE flags.
pub const CONTAINER_INHERIT: u8 = 0x02;
pub const INHERIT_ONLY: u8 = 0x08;
pub const INHERITED: u8 = 0x10;

/// Access mask bits.
pub const RIGHT_DS_WRITE_PROP: u32 = 0x20;
pub const RIGHT_DS_CONTROL_ACCESS: u32 = 0x100;
pub const GENERIC_ALL: u32 = 0x1000_0000;
pub const GENERIC_WRITE: u32 = 0x4000_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AceKind {
    Allow,
    Deny,
}

/// One access control entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    pub kind: AceKind,
    pub flags: u8,
    pub mask: u32,
    /// The right, property or property set the ACE is about (object ACEs only).
    pub object_type: Option<String>,
    /// The class of child object the ACE is inherited by (object ACEs only).
    pub inherited_object_type: Option<String>,
    pub sid: String,
}

/// A parsed security descriptor: control flags and DACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityDescriptor {
    pub control: u16,
    pub dacl: Vec<Ace>,
}

impl SecurityDescriptor {
    /// Whether inheritance from the parent is disabled.
    pub fn dacl_protected(&self) -> bool {
        self.control & SE_DACL_PROTECTED != 0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed security descriptor: {0}")]
pub struct SdError(&'static str);

fn u16_at(b: &[u8], at: usize) -> Result<u16, SdError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(SdError("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, SdError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(SdError("truncated"))
}

/// A binary SID as `S-1-5-21-…`.
///
/// # Errors
/// When the bytes are not a SID.
pub fn sid_to_string(b: &[u8]) -> Result<String, SdError> {
    let revision = *b.first().ok_or(SdError("empty SID"))?;
    let count = *b.get(1).ok_or(SdError("truncated SID"))? as usize;
    let authority = b.get(2..8).ok_or(SdError("truncated SID"))?;
    let authority = authority
        .iter()
        .fold(0u64, |acc, x| (acc << 8) | u64::from(*x));
    let mut s = format!("S-{revision}-{authority}");
    for i in 0..count {
        s.push_str(&format!("-{}", u32_at(b, 8 + 4 * i)?));
    }
    Ok(s)
}

/// The length of a binary SID.
fn sid_len(b: &[u8]) -> Result<usize, SdError> {
    Ok(8 + 4 * (*b.get(1).ok_or(SdError("truncated SID"))? as usize))
}

/// A binary GUID (little-endian layout) in canonical string form.
///
/// # Errors
/// When fewer than 16 bytes are given.
pub fn guid_to_string(b: &[u8]) -> Result<String, SdError> {
    let g = b.get(..16).ok_or(SdError("truncated GUID"))?;
    Ok(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    ))
}

/// Parses a self-relative security descriptor (as read from `nTSecurityDescriptor`).
///
/// # Errors
/// When it is malformed.
pub fn parse(b: &[u8]) -> Result<SecurityDescriptor, SdError> {
    let control = u16_at(b, 2)?;
    let dacl_at = u32_at(b, 16)? as usize;
    let mut dacl = Vec::new();
    if dacl_at != 0 {
        let count = u16_at(b, dacl_at + 4)? as usize;
        let mut at = dacl_at + 8;
        for _ in 0..count {
            let ace_type = *b.get(at).ok_or(SdError("truncated ACE"))?;
            let flags = *b.get(at + 1).ok_or(SdError("truncated ACE"))?;
            let size = u16_at(b, at + 2)? as usize;
            if size < 8 {
                return Err(SdError("ACE too small"));
            }
            let body = b
                .get(at + 4..at + size)
                .ok_or(SdError("truncated ACE body"))?;
            let mask = u32_at(body, 0)?;
            let parsed = match ace_type {
                0x00 | 0x01 => Some((None, None, 4)),
                0x05 | 0x06 => {
                    let object_flags = u32_at(body, 4)?;
                    let mut p = 8;
                    // Each optional GUID is present when its flag bit is set, in this order.
                    let mut guid_if = |bit: u32| -> Result<Option<String>, SdError> {
                        if object_flags & bit == 0 {
                            return Ok(None);
                        }
                        let g = guid_to_string(body.get(p..).ok_or(SdError("truncated"))?)?;
                        p += 16;
                        Ok(Some(g))
                    };
                    let object_type = guid_if(1)?;
                    let inherited = guid_if(2)?;
                    Some((object_type, inherited, p))
                }
                // audit, callback and other ACE types do not grant or deny access here
                _ => None,
            };
            if let Some((object_type, inherited_object_type, sid_at)) = parsed {
                let sid_bytes = body.get(sid_at..).ok_or(SdError("truncated SID"))?;
                let sid = sid_to_string(&sid_bytes[..sid_len(sid_bytes)?.min(sid_bytes.len())])?;
                dacl.push(Ace {
                    kind: if matches!(ace_type, 0x00 | 0x05) {
                        AceKind::Allow
                    } else {
                        AceKind::Deny
                    },
                    flags,
                    mask,
                    object_type,
                    inherited_object_type,
                    sid,
                });
            }
            at += size;
        }
    }
    Ok(SecurityDescriptor { control, dacl })
}

/// A right the writeback needs, as it appears in ACEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Right {
    pub name: &'static str,
    /// Control access (extended right) or write property.
    pub mask: u32,
    /// The extended right's or attribute's schema GUID.
    pub guid: &'static str,
}

/// Whether `sd` grants `right` to any of `trustees`, either on the object itself
/// (`on_descendants == false`) or inherited by descendant objects of class `class_guid`.
/// An applicable deny ACE wins.
pub fn grants(
    sd: &SecurityDescriptor,
    trustees: &[String],
    right: Right,
    on_descendants: bool,
    class_guid: &str,
) -> bool {
    let mut allowed = false;
    for ace in &sd.dacl {
        if !trustees.iter().any(|t| t.eq_ignore_ascii_case(&ace.sid)) {
            continue;
        }
        let applies_here = if on_descendants {
            ace.flags & CONTAINER_INHERIT != 0
                && ace
                    .inherited_object_type
                    .as_deref()
                    .is_none_or(|c| c.eq_ignore_ascii_case(class_guid))
        } else {
            ace.flags & INHERIT_ONLY == 0
        };
        if !applies_here {
            continue;
        }
        let mask_ok = ace.mask & right.mask != 0
            || ace.mask & GENERIC_ALL != 0
            || (right.mask == RIGHT_DS_WRITE_PROP && ace.mask & GENERIC_WRITE != 0);
        let object_ok = ace
            .object_type
            .as_deref()
            .is_none_or(|o| o.eq_ignore_ascii_case(right.guid));
        if mask_ok && object_ok {
            match ace.kind {
                AceKind::Deny => return false,
                AceKind::Allow => allowed = true,
            }
        }
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid_bytes(sub: &[u32]) -> Vec<u8> {
        let mut b = vec![1, sub.len() as u8, 0, 0, 0, 0, 0, 5];
        for s in sub {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    fn guid_bytes(canonical: &str) -> Vec<u8> {
        let hex: String = canonical.chars().filter(|c| *c != '-').collect();
        let mut be = hex::decode(hex).unwrap();
        be[0..4].reverse();
        be[4..6].reverse();
        be[6..8].reverse();
        be
    }

    fn object_ace(
        kind: u8,
        flags: u8,
        mask: u32,
        object: Option<&str>,
        inherited: Option<&str>,
        sid: &[u32],
    ) -> Vec<u8> {
        let mut body = mask.to_le_bytes().to_vec();
        let object_flags = u32::from(object.is_some()) | (u32::from(inherited.is_some()) << 1);
        body.extend_from_slice(&object_flags.to_le_bytes());
        if let Some(o) = object {
            body.extend(guid_bytes(o));
        }
        if let Some(i) = inherited {
            body.extend(guid_bytes(i));
        }
        body.extend(sid_bytes(sid));
        let mut ace = vec![kind, flags];
        ace.extend_from_slice(&((body.len() + 4) as u16).to_le_bytes());
        ace.extend(body);
        ace
    }

    fn sd(control: u16, aces: &[Vec<u8>]) -> Vec<u8> {
        let acl_len = 8 + aces.iter().map(Vec::len).sum::<usize>();
        let mut b = vec![1, 0];
        b.extend_from_slice(&control.to_le_bytes());
        b.extend_from_slice(&[0; 12]); // owner, group, sacl offsets
        b.extend_from_slice(&20u32.to_le_bytes()); // dacl at 20
        b.extend_from_slice(&[4, 0]);
        b.extend_from_slice(&(acl_len as u16).to_le_bytes());
        b.extend_from_slice(&(aces.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        for a in aces {
            b.extend_from_slice(a);
        }
        b
    }

    const USER: &str = "bf967aba-0de6-11d0-a285-00aa003049e2";
    const RESET: Right = Right {
        name: "Reset Password",
        mask: RIGHT_DS_CONTROL_ACCESS,
        guid: "00299570-246d-11d0-a768-00aa006e0529",
    };

    #[test]
    fn parses_sids_and_guids() {
        assert_eq!(
            sid_to_string(&sid_bytes(&[21, 1, 2, 3, 1103])).unwrap(),
            "S-1-5-21-1-2-3-1103"
        );
        assert_eq!(guid_to_string(&guid_bytes(USER)).unwrap(), USER);
    }

    #[test]
    fn finds_inherited_object_grants_and_honours_denies() {
        let me = vec!["S-1-5-21-1-2-3-1103".to_owned()];
        let grant = object_ace(
            0x05,
            CONTAINER_INHERIT | INHERIT_ONLY,
            RIGHT_DS_CONTROL_ACCESS,
            Some(RESET.guid),
            Some(USER),
            &[21, 1, 2, 3, 1103],
        );
        let parsed = parse(&sd(0, std::slice::from_ref(&grant))).unwrap();
        assert_eq!(parsed.dacl.len(), 1);
        assert!(grants(&parsed, &me, RESET, true, USER));
        assert!(
            !grants(&parsed, &me, RESET, false, USER),
            "inherit-only: not on the root itself"
        );
        assert!(
            !grants(&parsed, &["S-1-5-21-9".to_owned()], RESET, true, USER),
            "other trustee"
        );
        // inherited by computers only: not by users
        let computers = object_ace(
            0x05,
            CONTAINER_INHERIT,
            RIGHT_DS_CONTROL_ACCESS,
            Some(RESET.guid),
            Some("bf967a86-0de6-11d0-a285-00aa003049e2"),
            &[21, 1, 2, 3, 1103],
        );
        assert!(!grants(
            &parse(&sd(0, &[computers])).unwrap(),
            &me,
            RESET,
            true,
            USER
        ));
        // an explicit deny wins
        let deny = object_ace(
            0x06,
            CONTAINER_INHERIT,
            RIGHT_DS_CONTROL_ACCESS,
            Some(RESET.guid),
            None,
            &[21, 1, 2, 3, 1103],
        );
        assert!(!grants(
            &parse(&sd(0, &[grant, deny])).unwrap(),
            &me,
            RESET,
            true,
            USER
        ));
        assert!(parse(&sd(SE_DACL_PROTECTED, &[])).unwrap().dacl_protected());
        assert!(parse(&[1, 2, 3]).is_err());
    }
}

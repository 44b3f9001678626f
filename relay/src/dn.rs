//! Distinguished names as AD compares them (RFC 4514 strings): the writeback scope names OUs
//! and groups by DN, and "is this user under that OU" must not depend on how either DN was
//! spelled (`OU=Sales, DC=corp` and `ou=sales,dc=CORP` are one entry; `\,` and `\2C` are one
//! character).

use std::fmt;

/// A DN that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{dn:?} is not a distinguished name: {why}")]
pub struct DnError {
    pub dn: String,
    pub why: &'static str,
}

/// A parsed DN: its RDNs from the entry up to the root, each as (attribute type, value) with
/// escapes decoded, both in lower case (AD's DN matching ignores case).
/// Two `Dn`s are equal when they name one entry, however spelled.
#[derive(Debug, Clone)]
pub struct Dn {
    rdns: Vec<Vec<(String, String)>>,
    /// As given (trimmed), for messages and for sending back to AD.
    text: String,
}

impl Dn {
    /// Parses an RFC 4514 string DN (`CN=Alice\, Smith,OU=Sales,DC=corp,DC=example`).
    ///
    /// # Errors
    /// When it is empty, an RDN has no `=` or an empty type, or an escape is cut short.
    pub fn parse(dn: &str) -> Result<Self, DnError> {
        let err = |why| DnError {
            dn: dn.to_owned(),
            why,
        };
        let text = dn.trim();
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        let mut rdns = Vec::new();
        let mut rdn = Vec::new();
        let (mut ty, mut value) = (String::new(), Vec::<u8>::new());
        // Where the value's last character that must be kept ends (an escaped trailing
        // space is kept, an unescaped one is not).
        let mut kept = 0;
        let mut in_value = false;
        let bytes = text.as_bytes();
        let mut i = 0;
        let finish = |ty: &mut String,
                      value: &mut Vec<u8>,
                      kept: usize,
                      rdn: &mut Vec<(String, String)>|
         -> Result<(), DnError> {
            let t = ty.trim().to_ascii_lowercase();
            if t.is_empty() {
                return Err(err("an RDN has no attribute type"));
            }
            value.truncate(kept);
            let v = String::from_utf8(std::mem::take(value))
                .map_err(|_| err("an escaped value is not UTF-8"))?;
            rdn.push((t, v.to_lowercase()));
            ty.clear();
            Ok(())
        };
        while i < bytes.len() {
            let c = bytes[i];
            if !in_value {
                match c {
                    b'=' => in_value = true,
                    b',' | b'+' | b';' => return Err(err("an RDN has no '='")),
                    _ => ty.push(c as char),
                }
                i += 1;
                continue;
            }
            match c {
                b'\\' => {
                    let next = *bytes.get(i + 1).ok_or_else(|| err("it ends in '\\'"))?;
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            value.push(b);
                            i += 3;
                        }
                        None => {
                            value.push(next);
                            i += 2;
                        }
                    }
                    kept = value.len();
                }
                b',' | b';' | b'+' => {
                    finish(&mut ty, &mut value, kept, &mut rdn)?;
                    if c != b'+' {
                        rdns.push(std::mem::take(&mut rdn));
                    }
                    in_value = false;
                    kept = 0;
                    i += 1;
                }
                b' ' if value.is_empty() => i += 1,
                _ => {
                    value.push(c);
                    if c != b' ' {
                        kept = value.len();
                    }
                    i += 1;
                }
            }
        }
        if !in_value {
            return Err(err("an RDN has no '='"));
        }
        finish(&mut ty, &mut value, kept, &mut rdn)?;
        rdns.push(rdn);
        for r in &mut rdns {
            r.sort();
        }
        Ok(Self {
            rdns,
            text: text.to_owned(),
        })
    }

    /// Whether this entry is `ancestor` or lies in its subtree.
    pub fn is_within(&self, ancestor: &Dn) -> bool {
        self.rdns.ends_with(&ancestor.rdns)
    }

    /// The DN as it was given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Dn {
    fn eq(&self, other: &Self) -> bool {
        self.rdns == other.rdns
    }
}

impl Eq for Dn {}

impl std::hash::Hash for Dn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.rdns.hash(state);
    }
}

impl fmt::Display for Dn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    #[test]
    fn spellings_of_one_entry_are_equal() {
        assert_eq!(
            dn("OU=Sales,DC=corp,DC=example"),
            dn("ou=sales , dc=CORP,  DC=Example ")
        );
        assert!(dn("CN=A\\, B,OU=x,DC=c").is_within(&dn("ou=X,dc=C")));
        assert!(dn("CN=A\\2C B,OU=x,DC=c").is_within(&dn("CN=a\\, b,OU=X,DC=C")));
        // An escaped trailing space is part of the value; an unescaped one is not.
        assert_ne!(dn("OU=a\\ ,DC=c").rdns, dn("OU=a ,DC=c").rdns);
        // Multi-valued RDNs compare as sets.
        assert_eq!(dn("CN=a+UID=b,DC=c").rdns, dn("UID=b+CN=a,DC=c").rdns);
        // UTF-8 escapes decode.
        assert_eq!(
            dn("OU=M\\C3\\BCnchen,DC=c").rdns,
            dn("OU=münchen,DC=c").rdns
        );
    }

    #[test]
    fn subtree_membership_is_by_whole_rdns() {
        let ou = dn("OU=Sales,DC=corp,DC=example");
        assert!(dn("CN=alice,OU=Sales,DC=corp,DC=example").is_within(&ou));
        assert!(dn("CN=bob,OU=EMEA,OU=Sales,DC=corp,DC=example").is_within(&ou));
        assert!(ou.is_within(&ou));
        assert!(!dn("CN=carol,OU=PreSales,DC=corp,DC=example").is_within(&ou));
        assert!(!dn("CN=dave,OU=Sales,DC=other,DC=example").is_within(&ou));
        assert!(!dn("DC=corp,DC=example").is_within(&ou));
    }

    #[test]
    fn malformed_dns_say_what_is_wrong() {
        for (bad, why) in [
            ("", "it is empty"),
            ("   ", "it is empty"),
            ("Sales", "an RDN has no '='"),
            ("OU=Sales,corp", "an RDN has no '='"),
            ("=Sales,DC=c", "an RDN has no attribute type"),
            ("OU=Sales\\", "it ends in '\\'"),
        ] {
            let e = Dn::parse(bad).unwrap_err();
            assert_eq!(e.why, why, "{bad:?}");
            assert!(e.to_string().contains("is not a distinguished name"), "{e}");
        }
    }
}

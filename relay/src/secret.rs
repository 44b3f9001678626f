//! A string secret (password, token, agent secret) that never prints and is wiped on drop.

use zeroize::{Zeroize, ZeroizeOnDrop};

#[derive(Clone, Default, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from a file, trimming one trailing newline. The file must not be
    /// readable by every user nor writable by its group ([`check_private`]).
    ///
    /// # Errors
    /// When the file cannot be read or is not private; the error names the file and its mode,
    /// never its content.
    pub fn from_file(path: &std::path::Path) -> Result<Self, std::io::Error> {
        check_private(path)?;
        let mut raw = std::fs::read_to_string(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })?;
        let s = Self(raw.trim_end_matches(['\n', '\r']).to_owned());
        raw.zeroize();
        Ok(s)
    }
}

/// A secret file must be owner-only (0600) or shared with the service's group read-only
/// (0640): one that every user may read, or the group may write, is refused.
///
/// # Errors
/// Naming the file, its mode and the fix.
pub fn check_private(path: &std::path::Path) -> Result<(), std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & 0o027 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} must be private (it holds a secret or decides where secrets go) but its mode is {:03o}: others may read it or its group may write it; run `chmod 600 {}` (or 640 to share it read-only with the service's group)",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Writes a secret file owner-only (0600), creating or truncating it.
///
/// # Errors
/// When it cannot be written.
pub fn write_private(path: &std::path::Path, value: &str) -> Result<(), std::io::Error> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: make it private too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(value.as_bytes())
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.secret");
        write_private(&path, "s3cret\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), "s3cret");
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = Secret::from_file(&path);
            assert_eq!(r.is_ok(), ok, "{mode:o}");
            if let Err(e) = r {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("{mode:03o}")) && e.contains("chmod 600"),
                    "{e}"
                );
                assert!(!e.contains("s3cret"), "{e}");
            }
        }
    }
}

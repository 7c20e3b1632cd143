//! Atomic file replacement: after a crash a file holds either its old contents or its
//! new ones, never a mix; and durable renames (`sync_dir`). Knows nothing of what the files hold and creates no directories.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells apart the temporary files of writes running at once in one process.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `contents`: writes a temporary file in the same directory,
/// created with `mode` (less the umask, so the contents are never readable under a
/// wider mode), syncs it, renames it over `path` and syncs the directory so that the
/// rename itself survives a crash.
///
/// The directory must exist. On error the temporary file is removed and `path` keeps
/// what it had.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    // A crashed process with the same pid (always 1 in a container) may have left this
    // name behind with another mode; `create_new` below must make the file itself.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let replaced = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = replaced {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Syncs a directory, so that renames into or out of it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_the_file_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        for (name, want) in [("secret", 0o600), ("public", 0o644)] {
            let path = dir.path().join(name);
            write_atomically(&path, name.as_bytes(), want).unwrap();
            assert_eq!(fs::read(&path).unwrap(), name.as_bytes());
            assert_eq!(mode(&path), want, "{name}");
        }
    }

    #[test]
    fn replaces_an_existing_file_and_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, "old contents, longer than the new ones").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(names(dir.path()), vec!["secret"]);

        // The rename fails when the target is a directory; the temporary file goes too.
        let occupied = dir.path().join("occupied");
        fs::create_dir(&occupied).unwrap();
        assert!(write_atomically(&occupied, b"x", 0o600).is_err());
        assert_eq!(names(dir.path()), vec!["occupied", "secret"]);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent/secret");
        let error = write_atomically(&path, b"x", 0o600).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(names(dir.path()).is_empty(), "no directory is created");
    }

    #[test]
    fn a_path_without_a_file_name_is_an_error() {
        let error = write_atomically(Path::new("/"), b"x", 0o600).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}

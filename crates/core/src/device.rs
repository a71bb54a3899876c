//! What a path is as a storage device: its size and logical block size. Regular files
//! report their length; block devices are asked with BLKGETSIZE64 and BLKSSZGET, since
//! `stat` gives them a size of zero.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// Size and geometry of a file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Smallest unit the device can address (512 for files).
    pub logical_block_size: u32,
    /// True for a block device, false for a regular file.
    pub is_block_device: bool,
}

// _IOR(0x12, 114, size_t) and _IO(0x12, 104) from <linux/fs.h>.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Describes the regular file or block device at `path`.
pub fn device_info(path: &Path) -> Result<DeviceInfo> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("{shown}"), e))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(DeviceInfo { size_bytes: meta.len(), logical_block_size: 512, is_block_device: false });
    }
    if !ft.is_block_device() {
        let what = if ft.is_dir() { "a directory" } else { "not a regular file or block device" };
        return Err(Error::new(ErrorKind::NotADevice, format!("{shown}: {what}")));
    }
    let file = File::open(path).map_err(|e| Error::io(format!("{shown}"), e))?;
    let (size, lbs) = block_geometry(file.as_raw_fd()).map_err(|(what, e)| Error::io(format!("{shown}: {what}"), e))?;
    Ok(DeviceInfo { size_bytes: size, logical_block_size: lbs, is_block_device: true })
}

/// Size in bytes and logical block size of the open block device `fd`; on failure, the
/// name of the ioctl that failed and its error.
pub(crate) fn block_geometry(fd: RawFd) -> std::result::Result<(u64, u32), (&'static str, std::io::Error)> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which lives for the call.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
        return Err(("BLKGETSIZE64", std::io::Error::last_os_error()));
    }
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which lives for the call.
    if unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut lbs as *mut libc::c_int) } != 0 {
        return Err(("BLKSSZGET", std::io::Error::last_os_error()));
    }
    Ok((size, lbs as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_reports_its_length() {
        let dir = std::env::temp_dir().join(format!("ubcache-devinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![0u8; 12345]).unwrap();
        let info = device_info(&p).unwrap();
        assert_eq!(info, DeviceInfo { size_bytes: 12345, logical_block_size: 512, is_block_device: false });
        let err = device_info(&dir).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotADevice);
        let err = device_info(&dir.join("missing")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

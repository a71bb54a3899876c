//! Opening a regular file or block device for the engines: O_DIRECT where the filesystem
//! or device allows it, exclusive so that two cache sets (or two processes) never drive
//! the same device, and the geometry that requests are checked against.
//!
//! Exclusion: a block device is opened with O_EXCL, which the kernel refuses while it is
//! mounted or opened exclusively elsewhere; every device also takes a non-blocking `flock`,
//! which a second open (in this process or another) fails to get.
//!
//! O_DIRECT: [`DirectIo::Auto`] tries it and falls back to buffered I/O with one warning
//! where the filesystem refuses it or only pretends to support it (tmpfs). Under O_DIRECT,
//! offsets and lengths must be multiples of the logical block size and buffers aligned in
//! memory; misaligned requests are refused with [`ErrorKind::Misaligned`] (there is no
//! bounce buffer: [`crate::io::AlignedBuf`] already satisfies the memory alignment).
//!
//! Geometry: [`device_info`] says what a path is as a storage device (size, logical block
//! size) without opening it for I/O. Regular files report their length; block devices are
//! asked with BLKGETSIZE64 and BLKSSZGET, since `stat` gives them a size of zero.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

use crate::io::{warn_once, AlignedBuf, IoOp, IoRequest};
use crate::nbd::{is_nbd_uri, NbdClient, NbdOptions, NbdUri};

const TMPFS_MAGIC: i64 = 0x0102_1994;
// _IO(0x12, 119), _IOR(0x12, 114, size_t) and _IO(0x12, 104) from <linux/fs.h>.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
/// Most iovecs one readv/writev may carry (IOV_MAX on Linux).
pub const MAX_IOVECS: usize = 1024;
/// Largest single read or write (the kernel's MAX_RW_COUNT, rounded down to 4 KiB).
pub const MAX_IO_BYTES: u64 = 0x7fff_f000;

/// Whether to open with O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// O_DIRECT where supported, buffered (with one warning) where not.
    #[default]
    Auto,
    /// O_DIRECT or fail with [`ErrorKind::InvalidArgument`].
    Require,
    /// Buffered I/O through the page cache.
    Off,
}

/// How to open a device.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing too (default true).
    pub write: bool,
    /// O_DIRECT policy (default [`DirectIo::Auto`]).
    pub direct: DirectIo,
    /// Take the device exclusively (default true): O_EXCL for block devices, flock for all.
    pub exclusive: bool,
    /// If the path does not exist, create a regular file of this many bytes.
    pub create_size: Option<u64>,
    /// A remote device: how long a request waits for its reply, the server's return
    /// included, before it fails with `ETIMEDOUT` (default 30 s).
    pub remote_timeout: Option<std::time::Duration>,
    /// A remote device whose server advertises multi-conn: connections to open (default 4).
    pub remote_connections: Option<u32>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            write: true,
            direct: DirectIo::Auto,
            exclusive: true,
            create_size: None,
            remote_timeout: None,
            remote_connections: None,
        }
    }
}

/// An open file, block device or remote device (an NBD export) with its geometry. Shared
/// by the engines through `Arc`; the descriptor (and the exclusive lock) or the remote's
/// connection is released when the last reference goes.
#[derive(Debug)]
pub struct Device {
    /// None for a remote device.
    file: Option<File>,
    /// The client of a remote device.
    remote: Option<Arc<NbdClient>>,
    path: PathBuf,
    size: u64,
    logical_block_size: u32,
    mem_align: u32,
    direct: bool,
    writable: bool,
    is_block_device: bool,
}

impl Device {
    /// Opens the regular file or block device at `path`, or the remote device an NBD URI
    /// names (`nbd://host/export`, `nbd+unix:///export?socket=PATH`).
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Device> {
        let path = path.as_ref();
        if let Some(uri) = path.to_str().filter(|p| is_nbd_uri(p)) {
            let mut nbd = NbdOptions::default();
            if let Some(t) = opts.remote_timeout {
                nbd.request_timeout = t;
            }
            if let Some(n) = opts.remote_connections {
                nbd.connections = n;
            }
            return Device::open_remote(&NbdUri::parse(uri)?, opts, nbd);
        }
        let shown = path.display();
        let meta = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && opts.create_size.is_some() => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| Error::io(format!("{shown}: create"), e))?;
                f.set_len(opts.create_size.unwrap_or(0)).map_err(|e| Error::io(format!("{shown}: set size"), e))?;
                f.metadata().map_err(|e| Error::io(format!("{shown}"), e))?
            }
            r => r.map_err(|e| Error::io(format!("{shown}"), e))?,
        };
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !ft.is_file() && !is_block_device {
            let what = if ft.is_dir() { "a directory" } else { "not a regular file or block device" };
            return Err(Error::new(ErrorKind::NotADevice, format!("{shown}: {what}")));
        }

        let try_direct = opts.direct != DirectIo::Off;
        let (file, direct) = match open_file(path, opts, is_block_device, try_direct) {
            Ok(f) => (f, try_direct),
            Err(e) if try_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                if opts.direct == DirectIo::Require {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("{shown}: O_DIRECT is not supported here"),
                    ));
                }
                (open_file(path, opts, is_block_device, false).map_err(|e| open_error(path, e))?, false)
            }
            Err(e) => return Err(open_error(path, e)),
        };
        let mut dev = Device {
            file: Some(file),
            remote: None,
            path: path.to_path_buf(),
            size: 0,
            logical_block_size: 512,
            mem_align: 512,
            direct,
            writable: opts.write,
            is_block_device,
        };
        if opts.exclusive {
            lock_exclusive(dev.fd(), &shown.to_string())?;
        }
        if is_block_device {
            let (size, lbs) = block_geometry(dev.fd()).map_err(|(what, e)| Error::io(format!("{shown}: {what}"), e))?;
            dev.size = size;
            dev.logical_block_size = lbs;
            dev.mem_align = lbs;
        } else {
            dev.size = meta.len();
            if dev.direct {
                match dio_alignment(path, dev.fd()) {
                    DioSupport::Aligned { offset, mem } => {
                        dev.logical_block_size = offset.max(512);
                        dev.mem_align = mem.max(1);
                    }
                    DioSupport::Unknown => {
                        // Kernels before 6.1 do not say; the block size of most disks is safe.
                        dev.logical_block_size = 4096;
                        dev.mem_align = 4096;
                    }
                    DioSupport::Unsupported(why) => {
                        if opts.direct == DirectIo::Require {
                            return Err(Error::new(
                                ErrorKind::InvalidArgument,
                                format!("{shown}: O_DIRECT is not supported ({why})"),
                            ));
                        }
                        let exclusive = OpenOptions { exclusive: false, ..opts.clone() };
                        // The flock taken above belongs to the old descriptor: take it again.
                        let file = open_file(path, &exclusive, false, false).map_err(|e| open_error(path, e))?;
                        let old = dev.file.replace(file);
                        drop(old);
                        dev.direct = false;
                        if opts.exclusive {
                            lock_exclusive(dev.fd(), &shown.to_string())?;
                        }
                        warn_once(
                            "buffered-io",
                            &format!("{shown}: O_DIRECT is not supported ({why}); using buffered I/O"),
                        );
                    }
                }
            }
        }
        if try_direct && !dev.direct && !is_block_device && opts.direct == DirectIo::Auto {
            warn_once("buffered-io", &format!("{shown}: O_DIRECT is not supported; using buffered I/O"));
        }
        Ok(dev)
    }

    /// Connects to the export `uri` names. Its block size is the server's minimum (at least
    /// 512 bytes); it cannot be locked against other clients, so `exclusive` has no effect.
    pub fn open_remote(uri: &NbdUri, opts: &OpenOptions, nbd: NbdOptions) -> Result<Device> {
        let client = NbdClient::connect(uri, nbd)?;
        let info = client.info();
        if opts.write && !info.writable() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{}: the export is read-only (open it read-only)", uri.text),
            ));
        }
        let lbs = info.min_block.max(512);
        Ok(Device {
            file: None,
            remote: Some(Arc::new(client)),
            path: PathBuf::from(&uri.text),
            size: info.size,
            logical_block_size: lbs,
            mem_align: 1,
            direct: false,
            writable: opts.write,
            is_block_device: false,
        })
    }

    /// The NBD client of a remote device.
    pub fn remote(&self) -> Option<&Arc<NbdClient>> {
        self.remote.as_ref()
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in bytes (fixed at open time; I/O beyond it is refused).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Smallest addressable unit: offsets and lengths must be multiples of it under O_DIRECT.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// True when opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Alignment required of offsets and lengths (1 when buffered).
    pub fn alignment(&self) -> u32 {
        if self.direct || self.remote.is_some() {
            self.logical_block_size
        } else {
            1
        }
    }

    /// Alignment required of buffer addresses (1 when buffered).
    pub fn mem_alignment(&self) -> u32 {
        if self.direct {
            self.mem_align
        } else {
            1
        }
    }

    /// The raw descriptor, for the engines (-1 for a remote device, which they never touch).
    pub fn fd(&self) -> RawFd {
        self.file.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Runs `op` on a remote device and waits for it.
    fn remote_io(&self, client: &NbdClient, op: IoOp, offset: u64, fua: bool) -> std::io::Result<IoOp> {
        let c = client.execute(IoRequest { dev: crate::io::DevId(0), offset, op, user_data: 0, fua });
        match c.result {
            Ok(_) => Ok(c.op),
            Err(e) => Err(std::io::Error::other(e.message().to_string())),
        }
    }

    /// Checks a request against this device: range, alignment, permissions. Every engine
    /// calls this before touching the device, so bad input fails the same way everywhere.
    pub fn check(&self, req: &IoRequest) -> Result<()> {
        let shown = self.path.display();
        let (what, len) = match &req.op {
            IoOp::Flush => return Ok(()),
            IoOp::Read { buf } => ("read", buf.len() as u64),
            IoOp::Write { buf } => ("write", buf.len() as u64),
            IoOp::Readv { bufs } | IoOp::Writev { bufs } => {
                let what = if matches!(req.op, IoOp::Readv { .. }) { "readv" } else { "writev" };
                if bufs.is_empty() || bufs.len() > MAX_IOVECS {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("{shown}: {what} needs 1 to {MAX_IOVECS} buffers, got {}", bufs.len()),
                    ));
                }
                for b in bufs {
                    self.check_buffer(what, b)?;
                }
                (what, bufs.iter().map(|b| b.len() as u64).sum())
            }
            IoOp::Discard { len } => ("discard", *len),
        };
        if matches!(req.op, IoOp::Write { .. } | IoOp::Writev { .. } | IoOp::Discard { .. }) && !self.writable {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{shown}: {what} on a device opened read-only"),
            ));
        }
        if len == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{shown}: zero-length {what} at offset {}", req.offset),
            ));
        }
        if len > MAX_IO_BYTES && !matches!(req.op, IoOp::Discard { .. }) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{shown}: {what} of {len} bytes exceeds the {MAX_IO_BYTES}-byte limit of one request"),
            ));
        }
        match req.offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "{shown}: {what} of {len} bytes at offset {} goes past the end ({} bytes)",
                        req.offset, self.size
                    ),
                ))
            }
        }
        // BLKDISCARD wants sector alignment even on buffered block devices.
        let align = if matches!(req.op, IoOp::Discard { .. }) && self.is_block_device {
            self.logical_block_size as u64
        } else {
            self.alignment() as u64
        };
        if !req.offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(Error::new(
                ErrorKind::Misaligned,
                format!(
                    "{shown}: {what} of {len} bytes at offset {} is not aligned to the {align}-byte block size",
                    req.offset
                ),
            ));
        }
        match &req.op {
            IoOp::Read { buf } | IoOp::Write { buf } => self.check_buffer(what, buf),
            _ => Ok(()),
        }
    }

    fn check_buffer(&self, what: &str, b: &[u8]) -> Result<()> {
        let mem = self.mem_alignment() as usize;
        let lbs = self.alignment() as usize;
        if !(b.as_ptr() as usize).is_multiple_of(mem) || !b.len().is_multiple_of(lbs) {
            return Err(Error::new(
                ErrorKind::Misaligned,
                format!(
                    "{}: {what} buffer of {} bytes is not aligned for O_DIRECT (address to {mem}, length to {lbs} bytes)",
                    self.path.display(),
                    b.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`, completing short reads.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match (&self.file, &self.remote) {
            (Some(f), _) => f.read_exact_at(buf, offset),
            (None, Some(c)) => {
                if let IoOp::Read { buf: got } =
                    self.remote_io(c, IoOp::Read { buf: AlignedBuf::new(buf.len()) }, offset, false)?
                {
                    buf.copy_from_slice(&got);
                }
                Ok(())
            }
            (None, None) => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Writes all of `buf` at `offset`, completing short writes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        match (&self.file, &self.remote) {
            (Some(f), _) => f.write_all_at(buf, offset),
            (None, Some(c)) => {
                self.remote_io(c, IoOp::Write { buf: AlignedBuf::from_slice(buf) }, offset, false).map(|_| ())
            }
            (None, None) => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Vectored read of exactly the buffers' total length at `offset`.
    pub fn readv_at(&self, bufs: &mut [crate::io::AlignedBuf], offset: u64) -> std::io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            let iov = iovecs_from(bufs.iter_mut().map(|b| (b.as_mut_ptr(), b.len())), done, usize::MAX);
            // SAFETY: the iovecs point into buffers we hold mutably for the call.
            let n = unsafe { libc::preadv(self.fd(), iov.as_ptr(), iov.len() as i32, (offset + done as u64) as i64) };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "device ended before the read did",
                    ))
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if !retryable(&e) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Vectored write of all the buffers at `offset`.
    pub fn writev_at(&self, bufs: &[crate::io::AlignedBuf], offset: u64) -> std::io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        while done < total {
            let iov = iovecs_from(bufs.iter().map(|b| (b.as_ptr() as *mut u8, b.len())), done, usize::MAX);
            // SAFETY: the iovecs point into buffers we hold for the call; pwritev only reads.
            let n = unsafe { libc::pwritev(self.fd(), iov.as_ptr(), iov.len() as i32, (offset + done as u64) as i64) };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "device accepted no bytes")),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if !retryable(&e) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// fdatasync: everything written so far is durable when this returns.
    pub fn sync_data(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return match &self.remote {
                Some(c) => self.remote_io(c, IoOp::Flush, 0, false).map(|_| ()),
                None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
            };
        };
        loop {
            match file.sync_data() {
                Err(e) if retryable(&e) => continue,
                r => return r,
            }
        }
    }

    /// Tells the device `len` bytes at `offset` are unused: BLKDISCARD on a block device,
    /// a punched hole (size kept) in a file. Reads of the range return zeros on files and
    /// unspecified data on devices.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if let Some(c) = &self.remote {
            return self.remote_io(c, IoOp::Discard { len }, offset, false).map(|_| ());
        }
        if self.is_block_device {
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 through the pointer, which lives for the call.
            if unsafe { libc::ioctl(self.fd(), BLKDISCARD as _, range.as_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(());
        }
        loop {
            // SAFETY: plain syscall on a descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    self.fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if !retryable(&e) {
                return Err(e);
            }
        }
    }

    /// Runs one request synchronously on the calling thread (the portable engine's
    /// workers and the fault backend use this). Returns the bytes transferred.
    pub fn execute(&self, req: &mut IoRequest) -> Result<u64> {
        self.check(req)?;
        if let Some(c) = &self.remote {
            // The client owns a request while it is in flight: lend it the op, take it back.
            let op = std::mem::replace(&mut req.op, IoOp::Flush);
            let done =
                c.execute(IoRequest { dev: req.dev, offset: req.offset, op, user_data: req.user_data, fua: req.fua });
            req.op = done.op;
            return done.result;
        }
        let shown = self.path.display();
        let off = req.offset;
        let ctx = |what: &str| format!("{shown}: {what} at offset {off}");
        match &mut req.op {
            IoOp::Read { buf } => {
                self.read_at(buf, off).map_err(|e| Error::io(ctx("read"), e))?;
                Ok(buf.len() as u64)
            }
            IoOp::Write { buf } => {
                self.write_at(buf, off).map_err(|e| Error::io(ctx("write"), e))?;
                if req.fua {
                    self.sync_data().map_err(|e| Error::io(ctx("write (FUA: fdatasync)"), e))?;
                }
                Ok(buf.len() as u64)
            }
            IoOp::Readv { bufs } => {
                self.readv_at(bufs, off).map_err(|e| Error::io(ctx("readv"), e))?;
                Ok(bufs.iter().map(|b| b.len() as u64).sum())
            }
            IoOp::Writev { bufs } => {
                self.writev_at(bufs, off).map_err(|e| Error::io(ctx("writev"), e))?;
                if req.fua {
                    self.sync_data().map_err(|e| Error::io(ctx("writev (FUA: fdatasync)"), e))?;
                }
                Ok(bufs.iter().map(|b| b.len() as u64).sum())
            }
            IoOp::Flush => {
                self.sync_data().map_err(|e| Error::io(format!("{shown}: fdatasync"), e))?;
                Ok(0)
            }
            IoOp::Discard { len } => {
                let len = *len;
                self.discard(off, len).map_err(|e| Error::io(ctx("discard"), e))?;
                Ok(len)
            }
        }
    }
}

pub(crate) fn retryable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// iovecs covering at most `limit` bytes of the buffers after skipping the first `skip`
/// bytes (for resuming a short vectored transfer).
pub(crate) fn iovecs_from(
    bufs: impl Iterator<Item = (*mut u8, usize)>,
    mut skip: usize,
    mut limit: usize,
) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for (p, len) in bufs {
        if skip >= len {
            skip -= len;
            continue;
        }
        if limit == 0 {
            break;
        }
        let n = (len - skip).min(limit);
        // SAFETY: skip < len, so the pointer stays inside the buffer.
        out.push(libc::iovec { iov_base: unsafe { p.add(skip) } as *mut libc::c_void, iov_len: n });
        limit -= n;
        skip = 0;
    }
    out
}

/// How long an open waits for a lock still held by a process that has exited.
const DEAD_HOLDER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the device's flock, or fails with [`ErrorKind::Busy`] naming who holds it.
///
/// A process killed with SIGKILL keeps its lock for a moment after it has exited: its
/// io_uring ring is torn down by a kernel worker that still holds the file until in-flight
/// requests are cancelled. So when the holder (from /proc/locks) is a process that no
/// longer runs, the open waits for the lock (up to [`DEAD_HOLDER_WAIT`]) instead of
/// refusing a restart straight after a crash; a live holder is refused at once.
fn lock_exclusive(fd: RawFd, shown: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + DEAD_HOLDER_WAIT;
    loop {
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io(format!("{shown}: flock"), e));
        }
        let holder = flock_holder(fd);
        // No holder listed: the lock went between the two looks, so try again.
        let dead = holder.is_none_or(|pid| !process_runs(pid));
        if !dead || std::time::Instant::now() >= deadline {
            let by = match holder {
                Some(pid) if dead => format!(" (process {pid}, which exited, still holds it)"),
                Some(pid) if pid == std::process::id() => " (this process)".to_string(),
                Some(pid) => format!(" (process {pid})"),
                None => String::new(),
            };
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{shown}: already open by another cache set or process{by}"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The pid that /proc/locks names for a FLOCK lock on the file behind `fd`.
fn flock_holder(fd: RawFd) -> Option<u32> {
    // SAFETY: fstat fills the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let (major, minor) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let want = format!("{major:02x}:{minor:02x}:{}", st.st_ino);
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234 0 EOF"; blocked waiters start "1: ->".
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].parse().ok()).flatten()
    })
}

/// Whether `pid` is a process that still runs (not gone, not a zombie).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start())
            .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X')),
        Err(_) => false,
    }
}

fn open_file(path: &Path, opts: &OpenOptions, block: bool, direct: bool) -> std::io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    if block && opts.exclusive {
        flags |= libc::O_EXCL;
    }
    std::fs::OpenOptions::new().read(true).write(opts.write).custom_flags(flags).open(path)
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Error::new(
            ErrorKind::Busy,
            format!("{}: in use (mounted, or opened exclusively elsewhere)", path.display()),
        );
    }
    Error::io(format!("{}", path.display()), e)
}

enum DioSupport {
    Aligned { offset: u32, mem: u32 },
    Unknown,
    Unsupported(&'static str),
}

/// What the filesystem says about O_DIRECT on this file (statx STATX_DIOALIGN, Linux 6.1+).
fn dio_alignment(path: &Path, fd: RawFd) -> DioSupport {
    // tmpfs accepts O_DIRECT since 6.6 but serves it from the page cache.
    // SAFETY: statfs fills the struct we pass; fd is open.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut sfs) } == 0 && sfs.f_type as i64 == TMPFS_MAGIC {
        return DioSupport::Unsupported("tmpfs");
    }
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return DioSupport::Unknown;
    };
    // SAFETY: statx fills the struct we pass; cpath is NUL-terminated.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statx(libc::AT_FDCWD, cpath.as_ptr(), 0, libc::STATX_DIOALIGN, &mut stx) };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return DioSupport::Unknown;
    }
    if stx.stx_dio_offset_align == 0 {
        return DioSupport::Unsupported("the filesystem reports no O_DIRECT alignment");
    }
    DioSupport::Aligned { offset: stx.stx_dio_offset_align, mem: stx.stx_dio_mem_align }
}

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

/// Describes the regular file or block device at `path`, or the export an NBD URI names
/// (connecting to ask; its block size is the server's minimum, at least 512).
pub fn device_info(path: &Path) -> Result<DeviceInfo> {
    if let Some(uri) = path.to_str().filter(|p| is_nbd_uri(p)) {
        let c = NbdClient::connect(&NbdUri::parse(uri)?, NbdOptions::default())?;
        let i = c.info();
        return Ok(DeviceInfo { size_bytes: i.size, logical_block_size: i.min_block.max(512), is_block_device: false });
    }
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

//! The synchronous storage seam: byte reads, writes and flushes on one device, one at a
//! time. Opening a cache set reads its metadata through it (journal, prio chain, UUID
//! table, checkpoints) on whatever thread opens it; tests and tools use it to read and
//! damage devices. [`EngineStorage`] drives any [`IoEngine`] (the fault engine included)
//! with [`run_sync`]; [`MemStorage`] is a sparse in-memory device for tests and benchmarks.
//! The running cache set does not use it: its I/O goes through the engine asynchronously.

use std::collections::HashMap;

use crate::error::{Error, ErrorKind, Result};
use crate::io::{run_sync, AlignedBuf, DevId, IoEngine, IoRequest};

/// A cache device as the cache set uses it. Offsets and lengths are multiples of the
/// block size.
pub trait Storage {
    /// Fills `buf` from byte `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at byte `offset`; durable only after a later [`Storage::flush`].
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;
}

/// A device in an [`IoEngine`], driven one request at a time.
pub struct EngineStorage<E: IoEngine> {
    engine: E,
    dev: DevId,
    tag: u64,
}

impl<E: IoEngine> EngineStorage<E> {
    /// Storage on device `dev` of `engine`.
    pub fn new(engine: E, dev: DevId) -> Self {
        EngineStorage { engine, dev, tag: 0 }
    }

    /// The engine.
    pub fn engine(&mut self) -> &mut E {
        &mut self.engine
    }

    /// Gives the engine back.
    pub fn into_engine(self) -> E {
        self.engine
    }

    /// Runs one request. The engine must have nothing else in flight: a completion that is
    /// not this request's would be somebody else's, and is refused rather than dropped.
    fn run(&mut self, req: IoRequest) -> Result<crate::io::IoCompletion> {
        let mut others = Vec::new();
        let c = run_sync(&mut self.engine, req, &mut others)?;
        if !others.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{} completions of other requests arrived on a storage engine", others.len()),
            ));
        }
        match c.result {
            Ok(_) => Ok(c),
            Err(ref e) => Err(Error::new(e.kind(), e.message().to_string())),
        }
    }

    fn next_tag(&mut self) -> u64 {
        self.tag += 1;
        self.tag
    }
}

impl<E: IoEngine> Storage for EngineStorage<E> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let tag = self.next_tag();
        let c = self.run(IoRequest::read(self.dev, offset, AlignedBuf::new(buf.len()), tag))?;
        let data = c.into_buf().ok_or_else(|| Error::new(ErrorKind::Io, "read completion without a buffer"))?;
        buf.copy_from_slice(&data[..buf.len()]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let tag = self.next_tag();
        self.run(IoRequest::write(self.dev, offset, AlignedBuf::from_slice(data), tag)).map(|_| ())
    }

    fn flush(&mut self) -> Result<()> {
        let tag = self.next_tag();
        self.run(IoRequest::flush(self.dev, tag)).map(|_| ())
    }
}

const MEM_BLOCK: usize = 4096;
static ZERO_BLOCK: [u8; MEM_BLOCK] = [0; MEM_BLOCK];

/// A sparse in-memory device of `size` bytes: blocks never written, or written all zero,
/// take no memory. Counts bytes written and flushes.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    size: u64,
    blocks: HashMap<u64, Box<[u8]>>,
    /// Bytes written so far.
    pub bytes_written: u64,
    /// Flushes so far.
    pub flushes: u64,
}

impl MemStorage {
    /// An all-zero device of `size` bytes.
    pub fn new(size: u64) -> MemStorage {
        MemStorage { size, ..Default::default() }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        if !offset.is_multiple_of(MEM_BLOCK as u64) || !len.is_multiple_of(MEM_BLOCK) {
            return Err(Error::new(ErrorKind::Misaligned, format!("{len} bytes at {offset} are not 4 KiB aligned")));
        }
        if offset + len as u64 > self.size {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{len} bytes at {offset} pass the end ({})", self.size),
            ));
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        for (i, chunk) in buf.chunks_mut(MEM_BLOCK).enumerate() {
            match self.blocks.get(&(offset / MEM_BLOCK as u64 + i as u64)) {
                Some(b) => chunk.copy_from_slice(b),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        for (i, chunk) in data.chunks(MEM_BLOCK).enumerate() {
            let n = offset / MEM_BLOCK as u64 + i as u64;
            if chunk == &ZERO_BLOCK[..] {
                self.blocks.remove(&n);
            } else {
                self.blocks.insert(n, chunk.into());
            }
        }
        self.bytes_written += data.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for &mut S {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write(offset, data)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{open_engine, Device, EngineChoice, EngineOptions, OpenOptions};
    use std::sync::Arc;

    /// A completion that is not the storage's own is refused, never silently dropped.
    #[test]
    fn a_foreign_completion_is_refused_not_dropped() {
        let dir = std::env::temp_dir().join(format!("ubcache-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![7u8; 65536]).unwrap();
        let mut e = open_engine(&EngineOptions { choice: EngineChoice::Psync, ..Default::default() }).unwrap();
        let dev = Arc::new(
            Device::open(&p, &OpenOptions { direct: crate::io::DirectIo::Off, ..Default::default() }).unwrap(),
        );
        let id = e.add_device(dev).unwrap();
        let mut st = EngineStorage::new(e, id);
        let mut buf = vec![0u8; 4096];
        st.read(0, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 4096]);
        st.engine().submit(IoRequest::read(id, 4096, AlignedBuf::new(4096), 999_999));
        // Let the foreign read finish first (psync threads), so the next read meets it.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let err = st.read(8192, &mut buf).unwrap_err();
        assert!(err.message().contains("other requests"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

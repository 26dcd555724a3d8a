//! A power-loss fault for one process: an `LD_PRELOAD` library that keeps,
//! for every regular file under `DAI_POWERLOSS_DIR`, an undo log of the
//! writes made since that file's last `fsync`/`fdatasync`. After the process
//! is SIGKILLed, `tests/edge/power_loss.rs` applies the logs backwards, which
//! leaves each file as the disk held it at its last sync: what a power cut
//! does to data still in the page cache (the model LazyFS uses, without
//! FUSE). Built by the test with plain `rustc` (no crates), so it needs
//! nothing the toolchain does not have.
//!
//! Log layout (`DAI_POWERLOSS_LOG/N.undo`, the file's path in `N.path`): a
//! sequence of records `[offset u64][size before u64][len u64][len bytes]`,
//! little-endian, the bytes being what `[offset, offset+len)` held before
//! the write (cut at the old size). Undoing a record writes the bytes back
//! and truncates to the old size; `ftruncate` is logged the same way.
//!
//! Not modelled: the durability of creating, renaming or deleting files
//! (directory syncs); SQLite's `-shm` (rebuilt by SQLite after a crash) is
//! left alone. Every call the shim makes itself goes to the real libc
//! function found with `dlsym(RTLD_NEXT)`, never through its own wrappers.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

type ssize_t = isize;
type off_t = i64;
type size_t = usize;

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const O_WRONLY: c_int = 0o1;
const O_CREAT: c_int = 0o100;
const O_APPEND: c_int = 0o2000;
const O_TRUNC: c_int = 0o1000;
const O_CLOEXEC: c_int = 0o2000000;
const F_GETFL: c_int = 3;
const SEEK_CUR: c_int = 1;
const SEEK_END: c_int = 2;
const SEEK_SET: c_int = 0;

// libc functions the shim does not wrap: called directly.
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn readlink(path: *const c_char, buf: *mut c_char, len: size_t) -> ssize_t;
    fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    fn open64(path: *const c_char, flags: c_int, ...) -> c_int;
    fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t;
    fn lseek64(fd: c_int, off: off_t, whence: c_int) -> off_t;
}

/// One libc function resolved once through `RTLD_NEXT`.
struct Real(AtomicUsize, &'static [u8]);

impl Real {
    const fn new(name: &'static [u8]) -> Real {
        Real(AtomicUsize::new(0), name)
    }
    fn get(&self) -> usize {
        let mut p = self.0.load(Ordering::Acquire);
        if p == 0 {
            p = unsafe { dlsym(RTLD_NEXT, self.1.as_ptr().cast()) } as usize;
            self.0.store(p, Ordering::Release);
        }
        p
    }
}

static WRITE: Real = Real::new(b"write\0");
static PWRITE: Real = Real::new(b"pwrite64\0");
static FTRUNCATE: Real = Real::new(b"ftruncate64\0");
static FSYNC: Real = Real::new(b"fsync\0");
static FDATASYNC: Real = Real::new(b"fdatasync\0");
static CLOSE: Real = Real::new(b"close\0");

type WriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
type PwriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t;
type TruncFn = unsafe extern "C" fn(c_int, off_t) -> c_int;
type FdFn = unsafe extern "C" fn(c_int) -> c_int;

/// The real function behind `r` as the function pointer type `T`.
fn real_fn<T: Copy>(r: &Real) -> T {
    let p = r.get();
    if p == 0 {
        // Without the real function nothing can go on; a null fn pointer
        // must never be made.
        std::process::abort();
    }
    // SAFETY: `T` is the C signature of the symbol `r` names.
    unsafe { std::mem::transmute_copy::<usize, T>(&p) }
}

macro_rules! real {
    ($r:expr, $t:ty) => {
        real_fn::<$t>(&$r)
    };
}

/// fd -> undo log fd (`None`: not a file we watch), and path -> undo log fd.
struct Tracker {
    by_fd: HashMap<c_int, Option<c_int>>,
    by_path: HashMap<Vec<u8>, c_int>,
    next: usize,
}

static TRACKER: Mutex<Option<Tracker>> = Mutex::new(None);

fn env(name: &CStr) -> Option<Vec<u8>> {
    std::env::var_os(name.to_str().ok()?).map(|v| v.into_encoded_bytes())
}

/// The undo log of `fd`, opening it on first use; `None` for anything not
/// a regular file under DAI_POWERLOSS_DIR.
fn undo_fd(t: &mut Tracker, fd: c_int) -> Option<c_int> {
    if let Some(u) = t.by_fd.get(&fd) {
        return *u;
    }
    let u = resolve(t, fd);
    t.by_fd.insert(fd, u);
    u
}

fn resolve(t: &mut Tracker, fd: c_int) -> Option<c_int> {
    let dir = env(c"DAI_POWERLOSS_DIR")?;
    let log = env(c"DAI_POWERLOSS_LOG")?;
    let link = format!("/proc/self/fd/{fd}\0");
    let mut buf = [0u8; 4096];
    let n = unsafe { readlink(link.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    let path = buf[..n as usize].to_vec();
    if !path.starts_with(&dir) || path.ends_with(b"-shm") {
        return None;
    }
    if let Some(u) = t.by_path.get(&path) {
        return Some(*u);
    }
    let id = t.next;
    t.next += 1;
    let base = format!("{}/{id}", String::from_utf8_lossy(&log));
    let open = |p: String, flags: c_int| unsafe { open64(p.as_ptr().cast(), flags, 0o644u32) };
    let write = real!(WRITE, WriteFn);
    let flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
    let pfd = open(format!("{base}.path\0"), flags);
    if pfd >= 0 {
        unsafe {
            write(pfd, path.as_ptr().cast(), path.len());
            real!(CLOSE, FdFn)(pfd);
        }
    }
    let flags = O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC;
    let u = open(format!("{base}.undo\0"), flags);
    if u < 0 {
        return None;
    }
    t.by_path.insert(path, u);
    Some(u)
}

fn with<R>(f: impl FnOnce(&mut Tracker) -> R) -> R {
    let mut g = TRACKER.lock().unwrap_or_else(|e| e.into_inner());
    let t = g.get_or_insert_with(|| Tracker {
        by_fd: HashMap::new(),
        by_path: HashMap::new(),
        next: 0,
    });
    f(t)
}

/// Log what `[off, off+len)` of `fd` holds now (and its size), before it
/// is overwritten or cut.
fn save(u: c_int, fd: c_int, off: off_t, len: usize) {
    let pos = unsafe { lseek64(fd, 0, SEEK_CUR) };
    let size = unsafe { lseek64(fd, 0, SEEK_END) };
    if pos >= 0 {
        unsafe { lseek64(fd, pos, SEEK_SET) };
    }
    if size < 0 || off < 0 {
        return;
    }
    let keep = (size - off).clamp(0, len as i64) as usize;
    let mut rec = Vec::with_capacity(24 + keep);
    rec.extend_from_slice(&(off as u64).to_le_bytes());
    rec.extend_from_slice(&(size as u64).to_le_bytes());
    rec.extend_from_slice(&(keep as u64).to_le_bytes());
    let start = rec.len();
    rec.resize(start + keep, 0);
    let got = if keep > 0 {
        unsafe { pread64(fd, rec[start..].as_mut_ptr().cast(), keep, off) }
    } else {
        0
    };
    if got != keep as isize {
        // A short read: keep what was read, say so in the length.
        let got = got.max(0) as usize;
        rec.truncate(start + got);
        rec[16..24].copy_from_slice(&(got as u64).to_le_bytes());
    }
    unsafe { real!(WRITE, WriteFn)(u, rec.as_ptr().cast(), rec.len()) };
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    with(|t| {
        if let Some(u) = undo_fd(t, fd) {
            save(u, fd, off, n);
        }
        unsafe { real!(PWRITE, PwriteFn)(fd, buf, n, off) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    unsafe { pwrite64(fd, buf, n, off) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // Sockets, pipes and terminals never take the lock.
    if fd <= 2 {
        return unsafe { real!(WRITE, WriteFn)(fd, buf, n) };
    }
    with(|t| {
        if let Some(u) = undo_fd(t, fd) {
            // O_APPEND writes at the end whatever the position is.
            let append = unsafe { fcntl(fd, F_GETFL) } & O_APPEND != 0;
            let whence = if append { SEEK_END } else { SEEK_CUR };
            let off = unsafe { lseek64(fd, 0, whence) };
            save(u, fd, off, n);
        }
        unsafe { real!(WRITE, WriteFn)(fd, buf, n) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate64(fd: c_int, len: off_t) -> c_int {
    with(|t| {
        if let Some(u) = undo_fd(t, fd) {
            save(u, fd, len, usize::MAX >> 1);
        }
        unsafe { real!(FTRUNCATE, TruncFn)(fd, len) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ftruncate(fd: c_int, len: off_t) -> c_int {
    unsafe { ftruncate64(fd, len) }
}

/// A successful sync makes everything logged so far durable: the log
/// starts again empty. The lock is held across the sync so that no write
/// slips in between the sync and the truncation of its log.
fn synced(fd: c_int, sync: &Real) -> c_int {
    with(|t| {
        let rc = unsafe { real!(*sync, FdFn)(fd) };
        if rc == 0
            && let Some(u) = undo_fd(t, fd)
        {
            unsafe { real!(FTRUNCATE, TruncFn)(u, 0) };
        }
        rc
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    synced(fd, &FSYNC)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    synced(fd, &FDATASYNC)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    with(|t| t.by_fd.remove(&fd));
    unsafe { real!(CLOSE, FdFn)(fd) }
}

//! Small OS interfaces: the host's interface addresses (Envoy's "local
//! address") and core-dump limits.
use std::net::IpAddr;

/// The first non-loopback address of the family, from getifaddrs(3).
#[allow(unsafe_code)]
pub fn first_non_loopback(v6: bool) -> Option<IpAddr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family we check
            // before reading it as the matching sockaddr_in/_in6.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            let ip = if family == libc::AF_INET && !v6 {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ))
            } else if family == libc::AF_INET6 && v6 {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            } else {
                None
            };
            if let Some(ip) = ip {
                if !ip.is_loopback() {
                    found = Some(ip);
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `addrs` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    found
}

/// `--enable-core-dump`: raise RLIMIT_CORE to its hard maximum and make the
/// process dumpable.
#[allow(unsafe_code)]
pub fn enable_core_dumps() -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit/setrlimit to read and write.
    if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above; prctl(PR_SET_DUMPABLE, 1) takes plain integers.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) } != 0
        || unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Returns freed heap memory to the OS (glibc `malloc_trim`), after
/// config-time work that allocated a lot temporarily.
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tells the kernel the pages of a read-only static region may be dropped
/// (they are re-read from the binary if touched again), so they stop
/// counting toward RSS.
#[allow(unsafe_code)]
pub fn drop_static_pages(region: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let start = region.as_ptr() as usize;
    let end = start + region.len();
    // Only whole pages inside the region.
    let first = start.div_ceil(page) * page;
    let last = end / page * page;
    if last > first {
        // SAFETY: the range lies inside a read-only, file-backed static; with
        // MADV_DONTNEED its pages are simply re-faulted from the file later.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// Unmaps the resident pages of weir's own read-only, file-backed segments
/// (text and rodata) from the page tables after start-up (and after config
/// loads), so they stop counting toward RSS; the pages the process touches
/// from then on fault back in from the page cache (a minor fault each).
///
/// Start-up runs a great deal of code used only once (command line, YAML
/// and protobuf decoding, descriptor pool, translation of every resource),
/// and with the kernel's fault-around each page touched maps its 64 KiB
/// neighbourhood too: before this, ~11 of the binary's ~14 MiB of text
/// stayed resident at idle while serving touches a small part of it.
///
/// Only mappings of the executable that are not writable and hold no
/// anonymous (copy-on-write) pages are dropped, so the contents re-read from
/// the file are exactly the same bytes: the RELRO segment (relocated, so
/// anonymous) and data are left alone. Returns the bytes advised.
#[allow(unsafe_code)]
pub fn drop_binary_pages() -> usize {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Some(exe) = exe.to_str() else {
        return 0;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut dropped = 0;
    for (start, end) in clean_readonly_mappings(&smaps, exe) {
        // SAFETY: [start, end) is a whole mapping of the executable file,
        // private and read-only, without anonymous pages (checked above):
        // MADV_DONTNEED only drops its page-table entries, and every later
        // access re-reads identical bytes from the file.
        let r =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if r == 0 {
            dropped += end - start;
        }
    }
    dropped
}

/// The `[start, end)` ranges in a `/proc/PID/smaps` text of mappings of
/// `path` that are not writable and have no anonymous pages.
fn clean_readonly_mappings(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The current mapping when it is a candidate: (start, end, anonymous kB
    // seen so far or None before its `Anonymous:` line).
    let mut cur: Option<(usize, usize, Option<u64>)> = None;
    let mut flush = |cur: &mut Option<(usize, usize, Option<u64>)>| {
        if let Some((s, e, Some(0))) = cur.take() {
            out.push((s, e));
        }
    };
    for line in smaps.lines() {
        let mut f = line.split_ascii_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                // A mapping header: range perms offset dev inode [path].
                flush(&mut cur);
                let perms = f.next().unwrap_or("");
                let file = f.nth(3).unwrap_or("");
                let readonly = perms.len() == 4 && !perms.contains('w');
                if readonly && file == path && f.next().is_none() && e > s {
                    cur = Some((s, e, None));
                }
                continue;
            }
        }
        if first == "Anonymous:" {
            if let Some((_, _, anon)) = &mut cur {
                *anon = f.next().and_then(|v| v.parse().ok());
            }
        }
    }
    flush(&mut cur);
    out
}

/// The destination a connection had before the kernel redirected it
/// (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, netfilter NAT), as Envoy's
/// `getOriginalDst`. `None` when the kernel has none (no conntrack entry,
/// not Linux).
#[allow(unsafe_code)]
pub fn original_dst(s: &tokio::net::TcpStream) -> Option<std::net::SocketAddr> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // Both are option 80 of their level (linux/netfilter_ipv4.h,
        // linux/netfilter_ipv6/ip6_tables.h).
        const SO_ORIGINAL_DST: libc::c_int = 80;
        let local = s.local_addr().ok()?;
        let fd = s.as_raw_fd();
        // SAFETY: an all-zero sockaddr_storage is a valid value.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if local.is_ipv6() {
            libc::SOL_IPV6
        } else {
            libc::SOL_IP
        };
        // SAFETY: `ss` is writable for `len` bytes; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                SO_ORIGINAL_DST,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return None;
        }
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin =
                    unsafe { &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(std::net::SocketAddr::new(
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()),
                    u16::from_be(sin.sin_port),
                ))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe {
                    &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(std::net::SocketAddr::new(
                    IpAddr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                ))
            }
            _ => None,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = s;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_readonly_mappings_of_the_binary_only() {
        let smaps = "\
55d000000000-55d000100000 r--p 00000000 fd:00 12 /opt/weir
Rss:                  40 kB
Anonymous:             0 kB
55d000100000-55d000900000 r-xp 00100000 fd:00 12 /opt/weir
Anonymous:             0 kB
55d000900000-55d000a00000 r--p 00900000 fd:00 12 /opt/weir
Anonymous:           624 kB
55d000a00000-55d000a01000 rw-p 00a00000 fd:00 12 /opt/weir
Anonymous:             4 kB
55d000a01000-55d000a02000 r--p 00000000 fd:00 13 /opt/weir-other
Anonymous:             0 kB
55d000a02000-55d000a03000 r--p 00000000 fd:00 12 /opt/weir (deleted)
Anonymous:             0 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0
Anonymous:             0 kB
7f0000001000-7f0000002000 r-xp 00000000 fd:00 12 /opt/weir
";
        assert_eq!(
            clean_readonly_mappings(smaps, "/opt/weir"),
            vec![
                (0x55d000000000, 0x55d000100000),
                (0x55d000100000, 0x55d000900000)
            ]
        );
    }

    #[test]
    fn drop_binary_pages_keeps_the_process_working() {
        fn probe(x: u64) -> u64 {
            x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
        }
        let before = probe(std::hint::black_box(42));
        // The test binary's text and rodata are dropped and re-faulted.
        assert!(drop_binary_pages() > 0);
        assert_eq!(probe(std::hint::black_box(42)), before);
        assert_eq!(format!("{:?}", Some("rodata")), "Some(\"rodata\")");
    }
}

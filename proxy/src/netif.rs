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

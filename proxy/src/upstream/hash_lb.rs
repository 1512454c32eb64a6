//! Consistent-hash load balancing (`RING_HASH`, `MAGLEV`) and the request
//! hash of a route's `hash_policy`, as Envoy 1.40.
//!
//! The same hash functions and table construction as Envoy's
//! `RingHashLoadBalancer` and `MaglevTable`, so that for the same endpoints
//! and the same request key weir picks the same host as Envoy: hosts are
//! keyed by their address (`ip:port`, `[ipv6]:port`), their hostname with
//! `use_hostname_for_hashing`, or the endpoint metadata
//! `envoy.lb`/`hash_key`; ring entries hash `<key>_<i>` with xxHash64
//! (seed 0) or libstdc++'s MurmurHash2. Tables are built once per host-set
//! change (`HostSet::build`), over each priority level's healthy hosts (all
//! of them in panic), never per request.
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Uri};
use xds_client::config::{HashPolicy, HashPolicyKind, LbPolicy, RingHashFunction};
use xxhash_rust::xxh64::xxh64;

use super::Host;

/// xxHash64 of `data` (Envoy's `HashUtil::xxHash64`).
#[inline]
pub fn xxhash64(data: &[u8], seed: u64) -> u64 {
    xxh64(data, seed)
}

/// Envoy's `MurmurHash::murmurHash2` with its default seed: libstdc++'s
/// 64-bit `_Hash_bytes` (what `std::hash<std::string>` computes).
pub fn murmur2_64(key: &[u8]) -> u64 {
    const SEED: u64 = 0xc70f_6907;
    const MUL: u64 = (0xc6a4_a793u64 << 32) + 0x5bd1_e995;
    let shift_mix = |v: u64| v ^ (v >> 47);
    let mut hash = SEED ^ (key.len() as u64).wrapping_mul(MUL);
    let mut chunks = key.chunks_exact(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        let data = shift_mix(u64::from_le_bytes(b).wrapping_mul(MUL)).wrapping_mul(MUL);
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let data = rest
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) + u64::from(*b));
        hash ^= data;
        hash = hash.wrapping_mul(MUL);
    }
    hash = shift_mix(hash).wrapping_mul(MUL);
    shift_mix(hash)
}

/// A consistent-hash table over one priority level's hosts. Entries are
/// indexes into `HostSet::hosts`.
#[derive(Debug)]
pub enum HashTable {
    /// Sorted (hash, host) points (Envoy's ketama ring).
    Ring(Vec<(u64, u32)>),
    /// A Maglev lookup table of prime size.
    Maglev(Vec<u32>),
}

/// What building a table reports (Envoy's `ring_hash_lb.*` /
/// `maglev_lb.*` gauges).
#[derive(Debug, Clone, Copy, Default)]
pub struct TableStats {
    /// Ring size (ring hash only).
    pub size: u64,
    /// Fewest/most ring points or table entries of one host.
    pub min_per_host: u64,
    pub max_per_host: u64,
}

impl HashTable {
    /// Builds the table for `lb` over `usable` (indexes into `hosts`);
    /// `None` for a non-hash policy or no hosts.
    pub fn build(
        lb: &LbPolicy,
        hosts: &[Arc<Host>],
        usable: &[usize],
    ) -> Option<(HashTable, TableStats)> {
        let mut weighted = Vec::with_capacity(usable.len());
        normalize(hosts, usable, 1.0, &mut weighted);
        Self::build_weighted(lb, hosts, &weighted)
    }

    /// Builds the table for `lb` over (host index, normalized weight)
    /// pairs, in Envoy's order; `None` for a non-hash policy or no hosts.
    pub fn build_weighted(
        lb: &LbPolicy,
        hosts: &[Arc<Host>],
        normalized: &[(usize, f64)],
    ) -> Option<(HashTable, TableStats)> {
        if normalized.is_empty() {
            return None;
        }
        let use_hostname = match lb {
            LbPolicy::RingHash(r) => r.use_hostname,
            LbPolicy::Maglev(m) => m.use_hostname,
            _ => return None,
        };
        let weighted: Vec<(u32, String, f64)> = normalized
            .iter()
            .map(|(i, w)| (*i as u32, hash_key(&hosts[*i], use_hostname), *w))
            .collect();
        Some(match lb {
            LbPolicy::RingHash(r) => ring(
                &weighted,
                r.minimum_ring_size,
                r.maximum_ring_size,
                r.hash_function,
            ),
            LbPolicy::Maglev(m) => maglev(weighted, m.table_size),
            _ => return None,
        })
    }

    /// The host for `hash`; `attempt` > 0 when a retry host predicate
    /// rejected the previous pick (Envoy moves along the ring, or perturbs
    /// the Maglev hash).
    pub fn choose(&self, hash: u64, attempt: u32) -> Option<usize> {
        match self {
            HashTable::Ring(ring) => ring_choose(ring, hash, attempt),
            HashTable::Maglev(table) => {
                if table.is_empty() {
                    return None;
                }
                let mut h = hash;
                if attempt > 0 {
                    // Envoy: `hash ^= ~0ULL - attempt + 1`.
                    h ^= u64::MAX.wrapping_sub(u64::from(attempt)).wrapping_add(1);
                }
                Some(table[(h % table.len() as u64) as usize] as usize)
            }
        }
    }
}

/// Envoy's bounded-load pick (`BoundedLoadHashingLoadBalancer`): `first`
/// (the table's pick for `hash`) unless it has more active requests than
/// its slots, ⌈⌈(cluster active + 1) × `factor` / 100⌉ × its normalized
/// weight⌉ (at least 1); then the first host that is not over its slots
/// in a shuffle of `normalized` seeded by the hash (the same for the same
/// request hash, as Envoy's `std::mt19937`), else the least loaded one.
/// `active`: requests in flight on a host; `cluster_active`: on the
/// cluster (`upstream_rq_active`).
pub fn bounded_pick(
    first: usize,
    hash: u64,
    factor: u32,
    normalized: &[(usize, f64)],
    cluster_active: u64,
    active: impl Fn(usize) -> u64,
) -> usize {
    let total_slots = ((cluster_active + 1) * u64::from(factor)).div_ceil(100);
    let overload = |i: usize, w: f64| {
        let slots = ((total_slots as f64 * w).ceil() as u64).max(1);
        active(i) as f64 / slots as f64
    };
    let weight = |i: usize| {
        normalized
            .iter()
            .find(|(h, _)| *h == i)
            .map_or(0.0, |e| e.1)
    };
    let mut least = (first, overload(first, weight(first)));
    if least.1 <= 1.0 {
        return first;
    }
    let n = normalized.len();
    let mut order: Vec<usize> = (0..n).collect();
    // std::mt19937 takes the seed modulo 2^32.
    let mut rng = Mt19937::new(hash as u32);
    for i in 0..n {
        let j = rng.uniform((n - i) as u32) as usize;
        order.swap(i, i + j);
        let (alt, w) = normalized[order[i]];
        if alt == first {
            continue;
        }
        let f = overload(alt, w);
        if f <= 1.0 {
            return alt;
        }
        if f < least.1 {
            least = (alt, f);
        }
    }
    least.0
}

/// The 32-bit Mersenne Twister (`std::mt19937`), for Envoy's seeded
/// bounded-load probe order.
pub struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            for i in 0..624 {
                let x = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut xa = x >> 1;
                if x & 1 != 0 {
                    xa ^= 0x9908_b0df;
                }
                self.mt[i] = self.mt[(i + 397) % 624] ^ xa;
            }
            self.idx = 0;
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Uniform in [0, k) by rejection, as Envoy's `uniform_int` (k > 0).
    fn uniform(&mut self, k: u32) -> u32 {
        let bucket = (1u64 << 32) / u64::from(k);
        loop {
            let x = (u64::from(self.next_u32()) / bucket) as u32;
            if x < k {
                return x;
            }
        }
    }
}

/// Envoy's `normalizeHostWeights`: each of `members` gets its share of
/// their total weight, scaled by `share` (its locality's normalized weight,
/// or 1).
pub fn normalize(hosts: &[Arc<Host>], members: &[usize], share: f64, out: &mut Vec<(usize, f64)>) {
    let sum: u64 = members.iter().map(|i| u64::from(hosts[*i].weight)).sum();
    for i in members {
        out.push((*i, f64::from(hosts[*i].weight) * share / sum as f64));
    }
}

/// Envoy's `normalizeLocalityWeights` for one priority level's hosts `at`:
/// localities in Envoy's order (the node's own first, then by region, zone
/// and sub-zone), each with its `load_balancing_weight` over the total
/// (localities without weight get nothing), split among its healthy hosts
/// (all of them in panic) by their weights.
pub fn normalize_localities(
    hosts: &[Arc<Host>],
    at: &[usize],
    panic: bool,
    local: Option<&LocalityKey>,
) -> Vec<(usize, f64)> {
    let mut groups: std::collections::BTreeMap<&LocalityKey, Vec<usize>> = Default::default();
    for i in at {
        groups.entry(&*hosts[*i].locality).or_default().push(*i);
    }
    let mut ordered: Vec<(&LocalityKey, Vec<usize>)> = Vec::with_capacity(groups.len());
    if let Some(l) = local {
        if let Some(g) = groups.remove(l) {
            ordered.push((l, g));
        }
    }
    ordered.extend(groups);
    // A locality named twice takes its last entry's weight, as Envoy's map.
    let weight = |g: &[usize]| g.last().map_or(0, |i| hosts[*i].locality_weight);
    let sum: u64 = ordered.iter().map(|(_, g)| u64::from(weight(g))).sum();
    let mut out = Vec::new();
    if sum == 0 {
        return out;
    }
    for (_, g) in &ordered {
        let w = weight(g);
        if w == 0 {
            continue;
        }
        let members: Vec<usize> = g
            .iter()
            .copied()
            .filter(|i| panic || hosts[*i].is_healthy())
            .collect();
        normalize(hosts, &members, f64::from(w) / sum as f64, &mut out);
    }
    out
}

/// A locality (`region`, `zone`, `sub_zone`), ordered as Envoy's
/// `LocalityLess`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalityKey {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// Envoy's `hashKey`: metadata `envoy.lb`/`hash_key` when a non-empty
/// string, else the hostname or the address.
fn hash_key(h: &Host, use_hostname: bool) -> String {
    if let Some(k) = h
        .metadata
        .get("envoy.lb")
        .and_then(|m| m.get("hash_key"))
        .and_then(|v| v.as_str())
        .filter(|k| !k.is_empty())
    {
        return k.to_owned();
    }
    if use_hostname {
        h.hostname.clone()
    } else {
        h.addr.to_string()
    }
}

/// Envoy's `RingHashLoadBalancer::Ring`: scale so the lightest host gets a
/// whole number of points (at least `min` in all, at most `max`), then
/// give each host its share of points by running sums.
fn ring(
    hosts: &[(u32, String, f64)],
    min: u64,
    max: u64,
    func: RingHashFunction,
) -> (HashTable, TableStats) {
    let min_w = hosts.iter().map(|h| h.2).fold(1.0f64, f64::min);
    let scale = ((min_w * min as f64).ceil() / min_w).min(max as f64);
    let ring_size = scale.ceil() as u64;
    let mut ring: Vec<(u64, u32)> = Vec::with_capacity(ring_size.min(max) as usize);
    let mut current = 0.0f64;
    let mut target = 0.0f64;
    let mut min_per_host = ring_size;
    let mut max_per_host = 0u64;
    let mut buf = Vec::with_capacity(64);
    for (idx, key, w) in hosts {
        target += scale * w;
        let mut i = 0u64;
        while current < target {
            buf.clear();
            buf.extend_from_slice(key.as_bytes());
            buf.push(b'_');
            buf.extend_from_slice(i.to_string().as_bytes());
            let h = match func {
                RingHashFunction::XxHash => xxhash64(&buf, 0),
                RingHashFunction::MurmurHash2 => murmur2_64(&buf),
            };
            ring.push((h, *idx));
            i += 1;
            current += 1.0;
        }
        min_per_host = min_per_host.min(i);
        max_per_host = max_per_host.max(i);
    }
    ring.sort_unstable_by_key(|e| e.0);
    (
        HashTable::Ring(ring),
        TableStats {
            size: ring_size,
            min_per_host,
            max_per_host,
        },
    )
}

/// Envoy's ketama search (`Ring::chooseHost`): the first point at or after
/// `h`, wrapping to the start.
fn ring_choose(ring: &[(u64, u32)], h: u64, attempt: u32) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let n = ring.len() as i64;
    let (mut low, mut high) = (0i64, n);
    let mut mid;
    loop {
        mid = (low + high) / 2;
        if mid == n {
            mid = 0;
            break;
        }
        let midval = ring[mid as usize].0;
        let before = if mid == 0 {
            0
        } else {
            ring[mid as usize - 1].0
        };
        if h <= midval && h > before {
            break;
        }
        if midval < h {
            low = mid + 1;
        } else {
            high = mid - 1;
        }
        if low > high {
            mid = 0;
            break;
        }
    }
    if attempt > 0 {
        mid = (mid + i64::from(attempt)) % n;
    }
    Some(ring[mid as usize].1 as usize)
}

/// Envoy's `MaglevTable` (pseudocode listing 1 of the Maglev paper, with
/// weights): hosts sorted by key fill the table in turns, a host of the
/// largest weight every turn, lighter ones proportionally less often.
fn maglev(mut hosts: Vec<(u32, String, f64)>, size: u64) -> (HashTable, TableStats) {
    hosts.sort_by(|a, b| a.1.cmp(&b.1));
    let max_w = hosts.iter().map(|h| h.2).fold(0.0f64, f64::max);
    struct Entry {
        host: u32,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
        count: u64,
    }
    let mut entries: Vec<Entry> = hosts
        .iter()
        .map(|(host, key, weight)| Entry {
            host: *host,
            offset: xxhash64(key.as_bytes(), 0) % size,
            skip: xxhash64(key.as_bytes(), 1) % (size - 1) + 1,
            weight: *weight,
            target: 0.0,
            next: 0,
            count: 0,
        })
        .collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    let mut iteration = 1u32;
    while filled < size {
        for e in entries.iter_mut() {
            if filled >= size {
                break;
            }
            if f64::from(iteration) * e.weight < e.target {
                continue;
            }
            e.target += max_w;
            let mut c = e.offset.wrapping_add(e.skip.wrapping_mul(e.next)) % size;
            while table[c as usize] != u32::MAX {
                e.next += 1;
                c = e.offset.wrapping_add(e.skip.wrapping_mul(e.next)) % size;
            }
            table[c as usize] = e.host;
            e.next += 1;
            e.count += 1;
            filled += 1;
        }
        iteration = iteration.wrapping_add(1);
    }
    let min_per_host = entries.iter().map(|e| e.count).min().unwrap_or(size);
    let max_per_host = entries.iter().map(|e| e.count).max().unwrap_or(0);
    (
        HashTable::Maglev(table),
        TableStats {
            size,
            min_per_host: min_per_host.min(size),
            max_per_host,
        },
    )
}

/// The request's hash under a route's `hash_policy`, and the `Set-Cookie`
/// value to add to the response when a cookie policy generated one.
#[derive(Debug, Default)]
pub struct RequestHash {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

/// Envoy's `HashPolicyImpl::generateHash`: each policy that yields a hash
/// is folded in as `rotl(previous, 1) ^ new`; a terminal policy that
/// produced one stops the walk. `remote` is the downstream address (after
/// `x-forwarded-for`), `peer` and `local` the connection's own addresses.
pub fn request_hash(
    policies: &[HashPolicy],
    headers: &HeaderMap,
    uri: &Uri,
    remote: SocketAddr,
    peer: SocketAddr,
    local: SocketAddr,
    filter_state: Option<&filters::FilterState>,
) -> RequestHash {
    let mut out = RequestHash::default();
    for p in policies {
        let new = match &p.kind {
            HashPolicyKind::Header { name, rewrite } => {
                let mut values: Vec<std::borrow::Cow<'_, [u8]>> = headers
                    .get_all(name)
                    .iter()
                    .map(|v| std::borrow::Cow::Borrowed(v.as_bytes()))
                    .collect();
                // Envoy keeps the host as `:authority`: an HTTP/2 request's
                // authority is in its URI.
                if values.is_empty() && name == http::header::HOST {
                    if let Some(a) = uri.authority() {
                        values.push(std::borrow::Cow::Borrowed(a.as_str().as_bytes()));
                    }
                }
                if values.is_empty() {
                    None
                } else {
                    if let Some((re, sub)) = rewrite {
                        for v in values.iter_mut() {
                            let s = String::from_utf8_lossy(v);
                            let r = re.0.replace_all(&s, sub.as_str()).into_owned();
                            *v = std::borrow::Cow::Owned(r.into_bytes());
                        }
                    }
                    // The same hash whatever the order of the values; each
                    // value's hash seeds the next (Envoy 1.40's
                    // `HashUtil::xxHash64` over a span, checked against it).
                    values.sort();
                    Some(values.iter().fold(0, |seed, v| xxhash64(v, seed)))
                }
            }
            HashPolicyKind::Cookie {
                name,
                ttl,
                path,
                attributes,
            } => match cookie_value(headers, name) {
                Some(v) => Some(xxhash64(v.as_bytes(), 0)),
                None => match ttl {
                    Some(ttl) => {
                        // Envoy derives the value from the connection's
                        // own addresses (not x-forwarded-for): one value
                        // per connection.
                        let seed = format!("{peer}{local}");
                        let value = format!("{:016x}", xxhash64(seed.as_bytes(), 0));
                        let mut c = format!("{name}=\"{value}\"");
                        if !ttl.is_zero() {
                            c.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                        }
                        if !path.is_empty() {
                            c.push_str(&format!("; Path={path}"));
                        }
                        for (n, v) in attributes {
                            if v.is_empty() {
                                c.push_str(&format!("; {n}"));
                            } else {
                                c.push_str(&format!("; {n}={v}"));
                            }
                        }
                        c.push_str("; HttpOnly");
                        if let Ok(h) = HeaderValue::from_str(&c) {
                            out.set_cookie = Some(h);
                        }
                        Some(xxhash64(value.as_bytes(), 0))
                    }
                    None => None,
                },
            },
            HashPolicyKind::SourceIp => Some(xxhash64(remote.ip().to_string().as_bytes(), 0)),
            HashPolicyKind::QueryParameter { name } => {
                query_value(uri.query(), name).map(|v| xxhash64(v.as_bytes(), 0))
            }
            // A hashable object only (Envoy's `Hashable`), as its string.
            HashPolicyKind::FilterState { key } => filter_state
                .and_then(|s| s.get(key))
                .filter(|o| o.hashable())
                .and_then(|o| o.serialize_as_string())
                .map(|v| xxhash64(v.as_bytes(), 0)),
        };
        if let Some(n) = new {
            let old = out.hash.map_or(0, |h| h.rotate_left(1));
            out.hash = Some(old ^ n);
        }
        if p.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

/// Envoy's `parseCookieValue`: the first non-empty value of cookie `name`
/// in any `cookie` header, without surrounding double quotes.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for v in headers.get_all(http::header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for part in s.split(';') {
            let part = part.trim_start_matches(' ');
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            if k == name {
                let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                    &v[1..v.len() - 1]
                } else {
                    v
                };
                return (!v.is_empty()).then_some(v);
            }
        }
    }
    None
}

/// The first value of query parameter `name` (not decoded, as Envoy's
/// `QueryParamsMulti::parseQueryString`); a parameter without `=` has the
/// empty value.
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::config::{Maglev, RingHash};

    fn host(addr: &str, weight: u32) -> Arc<Host> {
        Arc::new(Host {
            weight,
            ..Host::test(addr.parse().expect("addr"))
        })
    }

    #[test]
    fn mt19937_matches_the_standard_sequence() {
        // The C++ standard's check: the 10000th output of a
        // default-constructed std::mt19937 (seed 5489).
        let mut m = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = m.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn bounded_pick_passes_over_hosts_past_their_slots() {
        let n = [(0, 1.0 / 3.0), (1, 1.0 / 3.0), (2, 1.0 / 3.0)];
        // 2 active on the table's pick, 2 on the cluster: 3 slots in all,
        // 1 per host; host 0 is over, so another host is picked.
        let load = [2, 0, 0];
        let p = bounded_pick(0, 42, 100, &n, 2, |i| load[i]);
        assert_ne!(p, 0);
        // The same hash probes in the same order.
        assert_eq!(bounded_pick(0, 42, 100, &n, 2, |i| load[i]), p);
        // Within its slots: the table's pick.
        assert_eq!(bounded_pick(0, 42, 100, &n, 0, |_| 0), 0);
        assert_eq!(bounded_pick(0, 42, 150, &n, 2, |i| [1, 0, 0][i]), 0);
        // Every host over: the least loaded.
        let load = [9, 7, 8];
        assert_eq!(bounded_pick(0, 42, 100, &n, 3, |i| load[i]), 1);
    }

    #[test]
    fn xxhash64_known_vectors() {
        assert_eq!(xxhash64(b"", 0), 0xef46_db37_51d8_e999);
        assert_eq!(xxhash64(b"abc", 0), 0x44bc_2cf5_ad77_0999);
    }

    #[test]
    fn murmur2_matches_libstdcxx_std_hash() {
        // Values of `std::hash<std::string>` from g++/libstdc++ (x86_64).
        for (s, want) in [
            ("", 0x553e_9390_1e46_2a6eu64),
            ("a", 0x454d_dee4_88c1_ed6b),
            ("abc", 0x32d8_2bf8_ed3d_ba39),
            ("127.0.0.1:8080_0", 0xde6d_9b15_4853_8b53),
            ("hello world 123456789", 0xd61d_f85e_a3f9_0c72),
            ("10.0.0.1:80_17", 0x3d93_8892_823c_2ba7),
        ] {
            assert_eq!(murmur2_64(s.as_bytes()), want, "{s:?}");
        }
    }

    #[test]
    fn ring_sizes_and_points_per_host() {
        let hosts = vec![host("10.0.0.1:80", 1), host("10.0.0.2:80", 1)];
        let lb = LbPolicy::RingHash(RingHash::default());
        let (t, st) = HashTable::build(&lb, &hosts, &[0, 1]).expect("ring");
        assert_eq!(st.size, 1024);
        assert_eq!((st.min_per_host, st.max_per_host), (512, 512));
        let HashTable::Ring(r) = &t else {
            panic!("ring expected")
        };
        assert_eq!(r.len(), 1024);
        assert!(r.windows(2).all(|w| w[0].0 <= w[1].0), "sorted");
        // Weights: 1 and 3 -> the light host gets ceil(0.25 × 1024) points.
        let hosts = vec![host("10.0.0.1:80", 1), host("10.0.0.2:80", 3)];
        let (_, st) = HashTable::build(&lb, &hosts, &[0, 1]).expect("ring");
        assert_eq!((st.min_per_host, st.max_per_host), (256, 768));
        // The maximum ring size caps the scale.
        let small = LbPolicy::RingHash(RingHash {
            minimum_ring_size: 4,
            maximum_ring_size: 6,
            ..RingHash::default()
        });
        let hosts: Vec<_> = (1..=4)
            .map(|i| host(&format!("10.0.0.{i}:80"), 1))
            .collect();
        let (t, st) = HashTable::build(&small, &hosts, &[0, 1, 2, 3]).expect("ring");
        assert_eq!(st.size, 4);
        let HashTable::Ring(r) = &t else {
            panic!("ring expected")
        };
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn ring_choose_is_the_first_point_at_or_after_the_hash() {
        let ring = vec![(10u64, 0u32), (20, 1), (30, 2)];
        assert_eq!(ring_choose(&ring, 0, 0), Some(0));
        assert_eq!(ring_choose(&ring, 10, 0), Some(0));
        assert_eq!(ring_choose(&ring, 11, 0), Some(1));
        assert_eq!(ring_choose(&ring, 30, 0), Some(2));
        assert_eq!(ring_choose(&ring, 31, 0), Some(0), "wraps");
        assert_eq!(ring_choose(&ring, 11, 1), Some(2), "next point on retry");
        assert_eq!(ring_choose(&[], 11, 0), None);
    }

    #[test]
    fn maglev_fills_the_table_by_weight_and_removal_only_remaps_the_removed() {
        let hosts: Vec<_> = (1..=3)
            .map(|i| host(&format!("10.0.0.{i}:80"), if i == 3 { 2 } else { 1 }))
            .collect();
        let lb = LbPolicy::Maglev(Maglev {
            table_size: 1009,
            use_hostname: false,
        });
        let (t, st) = HashTable::build(&lb, &hosts, &[0, 1, 2]).expect("table");
        let HashTable::Maglev(tab) = &t else {
            panic!("maglev expected")
        };
        assert!(tab.iter().all(|e| *e < 3), "every slot filled");
        let count = |h: u32| tab.iter().filter(|e| **e == h).count() as f64;
        // Host 2 has half the weight: about half the slots.
        let share = count(2) / 1009.0;
        assert!((share - 0.5).abs() < 0.02, "{share}");
        assert!(st.max_per_host >= st.min_per_host);
        let (t2, _) = HashTable::build(&lb, &hosts, &[0, 2]).expect("table");
        let HashTable::Maglev(tab2) = &t2 else {
            panic!("maglev expected")
        };
        let moved = tab
            .iter()
            .zip(tab2.iter())
            .filter(|(a, b)| **a != 1 && a != b)
            .count();
        // Maglev's disruption is small, not zero.
        assert!(moved < 1009 / 10, "{moved} slots of remaining hosts moved");
    }

    #[test]
    fn hash_policies_combine_as_envoy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("alice"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.insert(
            http::header::COOKIE,
            HeaderValue::from_static("other=1; session=\"abc\""),
        );
        let uri: Uri = "/p?x=1&user=bob&user=carol".parse().expect("uri");
        let remote: SocketAddr = "10.1.2.3:5555".parse().expect("addr");
        let local: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let header = |n: &str| HashPolicy {
            kind: HashPolicyKind::Header {
                name: http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                rewrite: None,
            },
            terminal: false,
        };
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let h = |ps: &[HashPolicy]| request_hash(ps, &headers, &uri, remote, peer, local, None);
        assert_eq!(h(&[header("x-user")]).hash, Some(xxhash64(b"alice", 0)));
        assert_eq!(
            h(&[header("x-multi")]).hash,
            Some(xxhash64(b"b", xxhash64(b"a", 0)))
        );
        assert_eq!(h(&[header("x-none")]).hash, None);
        let both = h(&[header("x-user"), header("x-multi")]).hash;
        assert_eq!(
            both,
            Some(xxhash64(b"alice", 0).rotate_left(1) ^ xxhash64(b"b", xxhash64(b"a", 0)))
        );
        let mut t = header("x-user");
        t.terminal = true;
        assert_eq!(h(&[t, header("x-multi")]).hash, Some(xxhash64(b"alice", 0)));
        let q = HashPolicy {
            kind: HashPolicyKind::QueryParameter {
                name: "user".into(),
            },
            terminal: false,
        };
        assert_eq!(h(&[q]).hash, Some(xxhash64(b"bob", 0)));
        let ip = HashPolicy {
            kind: HashPolicyKind::SourceIp,
            terminal: false,
        };
        assert_eq!(h(&[ip]).hash, Some(xxhash64(b"10.1.2.3", 0)));
        let cookie = |name: &str, ttl: Option<u64>| HashPolicy {
            kind: HashPolicyKind::Cookie {
                name: name.into(),
                ttl: ttl.map(std::time::Duration::from_secs),
                path: "/app".into(),
                attributes: vec![
                    ("SameSite".into(), "Strict".into()),
                    ("Secure".into(), String::new()),
                ],
            },
            terminal: false,
        };
        let r = h(&[cookie("session", Some(60))]);
        assert_eq!(r.hash, Some(xxhash64(b"abc", 0)));
        assert!(r.set_cookie.is_none(), "present cookie: nothing to set");
        assert_eq!(h(&[cookie("missing", None)]).hash, None);
        let r = h(&[cookie("missing", Some(60))]);
        let value = format!("{:016x}", xxhash64(b"127.0.0.1:400010.0.0.1:80", 0));
        assert_eq!(r.hash, Some(xxhash64(value.as_bytes(), 0)));
        assert_eq!(
            r.set_cookie.expect("generated").to_str().expect("ascii"),
            format!(
                "missing=\"{value}\"; Max-Age=60; Path=/app; SameSite=Strict; Secure; HttpOnly"
            )
        );
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("a=1&b=2&b=3"), "b"), Some("2"));
        assert_eq!(query_value(Some("a&b=2"), "a"), Some(""));
        assert_eq!(query_value(Some("ab=1"), "a"), None);
        assert_eq!(query_value(None, "a"), None);
    }
}

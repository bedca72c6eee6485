//! Route templates: a request path with its ids and personal data (numbers, UUIDs, hex,
//! e-mail addresses, user names, tokens) replaced by `{id}`; a cap on live routes per process.
use std::collections::HashMap;

/// Distinct routes live per process; while that many are, new ones are reported as `OTHER`.
pub const MAX_ROUTES: usize = 100;
/// A route not seen for this many intervals frees its place.
pub const IDLE_INTERVALS: u64 = 10;
pub const OTHER: &str = "other";

/// `/users/42/orders/3f2a9c10` -> `/users/{id}/orders/{id}`.
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_id(segment) || is_user(segment) || is_token(segment) {
            out.push_str("{id}");
        } else {
            out.push_str(segment);
        }
    }
    out
}

fn is_id(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    if digits == s.len() {
        return true;
    }
    let hexish = s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    // UUIDs and hashes: long hex with at least one digit.
    if hexish && s.len() >= 8 && digits > 0 {
        return true;
    }
    // Other tokens carrying numbers: `item-123`, `v2x9k3m1q0` (not `v1`, `api2`).
    digits >= 3 && s.len() >= 4
}

/// E-mail addresses and user names: `jane@example.com`, `@jane`, `~jane`, and the same
/// percent-encoded (`jane%40example.com`).
fn is_user(s: &str) -> bool {
    s.contains('@') || s.to_ascii_lowercase().contains("%40") || (s.len() > 1 && s.starts_with('~'))
}

fn is_base64url(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'+'))
}

/// Random-looking strings: API keys, session ids, base64url blobs and JWT-like
/// `header.payload.signature`; not words, camelCase names or hyphenated slugs.
fn is_token(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 1 && parts.iter().all(|p| is_base64url(p)) {
        // A JWT's header is base64url JSON: `{"` encodes as `eyJ`. Two parts: one cut
        // short by the 64-byte path limit.
        return s.starts_with("eyJ") || (parts.len() == 3 && parts.iter().any(|p| random_looking(p)));
    }
    is_base64url(s) && random_looking(s)
}

/// At least 16 characters, and either the character classes (upper, lower, digit) change
/// between neighbours as often as in random text (random base64 changes at 2 of 3
/// neighbours, `XMLHttpRequestHandler` at 1 in 4), or, for 20+ single-case letters and
/// digits, the spread of characters is that of random text (3.8 bits per character and
/// more; English words stay near 3).
fn random_looking(s: &str) -> bool {
    if s.len() < 16 {
        return false;
    }
    let class = |b: u8| match b {
        b'A'..=b'Z' => 1,
        b'a'..=b'z' => 2,
        b'0'..=b'9' => 3,
        _ => 0,
    };
    let (mut pairs, mut changes) = (0usize, 0usize);
    for w in s.as_bytes().windows(2) {
        let (a, b) = (class(w[0]), class(w[1]));
        if a != 0 && b != 0 {
            pairs += 1;
            changes += usize::from(a != b);
        }
    }
    if pairs >= 10 && changes * 100 >= pairs * 40 {
        return true;
    }
    // Single-case only: mixed-case names (`AbstractSingletonProxyFactoryBean`) spread as widely.
    let single_case = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        || s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    s.len() >= 20 && single_case && entropy(s) >= 3.8
}

/// Shannon entropy of the bytes of `s`, in bits per byte.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = s.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| -(f64::from(c) / n) * (f64::from(c) / n).log2()).sum()
}

/// Templates routes and caps the number live per process.
#[derive(Debug, Default)]
pub struct Routes {
    /// Per process, each live route and the interval it was last seen in.
    seen: HashMap<u32, HashMap<String, u64>>,
    interval: u64,
}

impl Routes {
    pub fn route(&mut self, pid: u32, path: &str) -> String {
        let route = template(path);
        let seen = self.seen.entry(pid).or_default();
        if let Some(last) = seen.get_mut(&route) {
            *last = self.interval;
            return route;
        }
        if seen.len() >= MAX_ROUTES {
            return OTHER.to_string();
        }
        seen.insert(route.clone(), self.interval);
        route
    }

    /// Ends an interval: routes idle for `IDLE_INTERVALS` go, and processes without routes.
    pub fn end_interval(&mut self) {
        self.interval += 1;
        let now = self.interval;
        for routes in self.seen.values_mut() {
            routes.retain(|_, last| now - *last < IDLE_INTERVALS);
        }
        self.seen.retain(|_, routes| !routes.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapses_ids() {
        assert_eq!(template("/sleep/10"), "/sleep/{id}");
        assert_eq!(template("/users/42/orders/7"), "/users/{id}/orders/{id}");
        assert_eq!(template("/o/123e4567-e89b-12d3-a456-426614174000"), "/o/{id}");
        assert_eq!(template("/blob/3f2a9c10aa"), "/blob/{id}");
        assert_eq!(template("/item-12345/x"), "/{id}/x");
        assert_eq!(template("/api/v1/health"), "/api/v1/health");
        assert_eq!(template("/"), "/");
        assert_eq!(template("/cafe/face"), "/cafe/face");
    }

    #[test]
    fn hides_people_and_secrets() {
        assert_eq!(template("/users/jane.doe@example.com/orders"), "/users/{id}/orders");
        assert_eq!(template("/u/jane%40example.com"), "/u/{id}");
        assert_eq!(template("/@jane_doe/posts"), "/{id}/posts");
        assert_eq!(template("/~jane/public_html"), "/{id}/public_html");
        assert_eq!(template("/reset/Zk9aQmR4TnBxV2tLc0x0"), "/reset/{id}");
        assert_eq!(template("/s/aB-x_Yz9QwErTyUiOp"), "/s/{id}");
        assert_eq!(template("/auth/qwzxkjvbnmpoiuytrewqasd"), "/auth/{id}");
        let jwt =
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(template(&format!("/verify/{jwt}")), "/verify/{id}");
        assert_eq!(template("/t/aGVsbG8.d29ybGQxMjM0NTY3ODk.c2lnbmF0dXJl"), "/t/{id}");
        let cut: String = format!("/verify/{jwt}").chars().take(64).collect();
        assert_eq!(template(&cut), "/verify/{id}", "a JWT cut short by the path limit");
    }

    #[test]
    fn keeps_ordinary_words() {
        for path in [
            "/users",
            "/api/v1/orders",
            "/healthz",
            "/readyz",
            "/static/jquery.min.js",
            "/docs/how-to-configure-your-router",
            "/rpc/getUserProfileSettings",
            "/XMLHttpRequestHandler",
            "/AbstractSingletonProxyFactoryBean",
            "/ConfigurationManagerSettings",
            "/internationalization",
            "/api/v2/users/search",
            "/files/report.final.pdf",
            "/well_known/openid_configuration",
        ] {
            assert_eq!(template(path), path, "{path} has no id in it");
        }
    }

    #[test]
    fn caps_distinct_routes() {
        let mut r = Routes::default();
        for i in 0..MAX_ROUTES {
            assert_eq!(
                r.route(1, &format!("/r{}x", char::from(b'a' + (i % 26) as u8)).repeat(i / 26 + 1)),
                { template(&format!("/r{}x", char::from(b'a' + (i % 26) as u8)).repeat(i / 26 + 1)) }
            );
        }
        assert_eq!(r.route(1, "/brand/new"), OTHER);
        assert_eq!(r.route(1, "/rax"), "/rax");
        assert_eq!(r.route(2, "/brand/new"), "/brand/new");
        // Only /rax stays in use: the other routes' places free up.
        for _ in 0..IDLE_INTERVALS {
            r.end_interval();
            assert_eq!(r.route(1, "/rax"), "/rax");
        }
        assert_eq!(r.route(1, "/brand/new"), "/brand/new");
        assert_eq!(r.seen[&1].len(), 2);
        assert!(!r.seen.contains_key(&2), "a process without routes is forgotten");
    }

    #[test]
    fn a_flood_of_paths_keeps_the_map_bounded() {
        let mut r = Routes::default();
        let word =
            |i: u32| -> String { (0..4).map(|k| char::from(b'a' + ((i >> (5 * k)) % 26) as u8)).collect() };
        for i in 0..100_000u32 {
            r.route(1, &format!("/item/{}", word(i)));
            if i % 1000 == 999 {
                r.end_interval();
            }
        }
        assert!(
            r.seen.get(&1).map_or(0, HashMap::len) <= MAX_ROUTES,
            "{:?}",
            r.seen.get(&1).map(HashMap::len)
        );
        assert_eq!(r.route(1, "/item/zzzz"), "/item/zzzz", "{:?}", r.seen);
    }
}

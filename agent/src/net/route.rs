//! Route templates: a request path with its ids (numbers, UUIDs, hex and other
//! digit-bearing tokens) replaced by `{id}`, and a cap on distinct routes per process.
use std::collections::{HashMap, HashSet};

/// Distinct routes kept per process; later ones are reported as `OTHER`.
pub const MAX_ROUTES: usize = 100;
pub const OTHER: &str = "other";

/// `/users/42/orders/3f2a9c10` -> `/users/{id}/orders/{id}`.
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_id(segment) {
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

/// Templates routes and caps their number per process.
#[derive(Debug, Default)]
pub struct Routes {
    seen: HashMap<u32, HashSet<String>>,
}

impl Routes {
    pub fn route(&mut self, pid: u32, path: &str) -> String {
        let route = template(path);
        let seen = self.seen.entry(pid).or_default();
        if seen.contains(&route) {
            return route;
        }
        if seen.len() >= MAX_ROUTES {
            return OTHER.to_string();
        }
        seen.insert(route.clone());
        route
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
    }
}

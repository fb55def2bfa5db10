//! The request line: `req <id> key=<user> sess=<session> idem=<0|1>`.

use crate::log::Id;

/// The line of request `id`, sent as user `key` in session `session`.
pub fn line(id: Id, key: &str, session: &str, idempotent: bool) -> String {
    format!(
        "req {id} key={key} sess={session} idem={}",
        u8::from(idempotent)
    )
}

/// The id in a request line.
pub fn parse_id(line: &str) -> Option<Id> {
    line.strip_prefix("req ")?.split(' ').next()?.parse().ok()
}

/// The session in a request line.
pub fn parse_session(line: &str) -> Option<&str> {
    line.split(' ').find_map(|w| w.strip_prefix("sess="))
}

/// The key in a request line.
pub fn parse_key(line: &str) -> Option<&str> {
    line.split(' ').find_map(|w| w.strip_prefix("key="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let l = line(42, "u3", "s7", true);
        assert_eq!(parse_id(&l), Some(42));
        assert_eq!(parse_key(&l), Some("u3"));
        assert_eq!(parse_session(&l), Some("s7"));
        assert_eq!(parse_id("garbage"), None);
    }
}

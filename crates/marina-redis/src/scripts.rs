//! The server-side steps, one Lua script each: run with `EVALSHA`, loaded when the
//! fleet opens and again when Redis answers `NOSCRIPT` (after a restart or a
//! `SCRIPT FLUSH`). Each takes the time from Redis (`TIME`), so the instances' clocks
//! never matter, and writes only the key it is given, with a TTL, so Redis memory
//! stays bounded by the live quotas, holders and sessions.
//!
//! Times are microseconds of Redis time, kept as Lua numbers (doubles: whole
//! microseconds are exact up to 2^53, the year 2255) and written with `%.3f` or `%.0f`:
//! Lua's own number-to-string keeps only 14 digits.

use std::sync::LazyLock;

/// A script and its SHA1, the name `EVALSHA` runs it by.
pub(crate) struct Script {
    pub(crate) code: &'static str,
    pub(crate) hash: String,
}

impl Script {
    fn new(code: &'static str) -> Self {
        Script {
            code,
            hash: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// `EVALSHA <sha> 1 <key>`: add the arguments.
    pub(crate) fn cmd(&self, key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(1).arg(key);
        cmd
    }
}

/// GCRA, taking up to `want` free cells at once (a lease), or reserving the next
/// cell when it frees within `max_wait`.
///
/// KEYS[1]: the quota's theoretical arrival time. ARGV: the period `T` and the
/// tolerance `tau = (burst - 1) * T` (µs, fractional allowed), the cells wanted, the
/// longest wait for a reserved cell (µs; 0: none).
///
/// Returns `{granted, wait, next}`: cells granted (0: refused), the wait before the
/// first of them (0: now; above 0 with one cell granted: a reservation; with none: how
/// long until a cell frees), and how long until the next cell after these frees (0:
/// one is free now). The key lives until its state is in the past, when it means
/// nothing more than no key.
pub(crate) static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local granted, wait = 0, 0
local free = math.floor((now + tau - tat) / period) + 1
if free >= 1 then
  granted = math.min(want, free)
  tat = tat + granted * period
else
  wait = tat - tau - now
  if wait <= max_wait then
    granted = 1
    tat = tat + period
  end
end
if granted > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local next = tat - tau - now
if next < 0 then next = 0 end
return {granted, math.ceil(wait), math.ceil(next)}
"#,
    )
});

/// A permit of a fleet-wide semaphore: a member of the key's sorted set whose score
/// is the end of its lease. Expired leases are dropped first, so a crashed holder's
/// permits come back when their lease ends.
///
/// KEYS[1]: the holders. ARGV: the limit, the lease (µs), the new member.
///
/// Returns `{1, holders}` when taken, `{0, µs until the first lease ends}` when full.
/// The key's TTL is one lease from the last taking or renewal: it outlives every
/// member.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1)
  return {1, n + 1}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.ceil(tonumber(first[2]) - now)}
"#,
    )
});

/// Renews this instance's permits of one key for another lease.
///
/// KEYS[1]: the holders. ARGV: the lease (µs), then the members.
///
/// Returns how many were still held (and are renewed). A member no longer there
/// lost its permit (its lease ended while Redis could not be reached): it is not
/// added back.
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local until_ = string.format('%.0f', now + lease)
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1)
end
return renewed
"#,
    )
});

/// Pins a session: compare and set, so instances that race agree.
///
/// KEYS[1]: the session. ARGV: the endpoint chosen, the endpoint the pinning instance
/// saw there (`''`: none), the idle timeout (ms).
///
/// Sets the endpoint when the session is absent, or still where the instance saw it
/// (a re-pin after its endpoint failed); otherwise keeps the pin another instance
/// made meanwhile and refreshes its expiry. Returns the endpoint pinned after.
pub(crate) static PIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[2] or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return ARGV[1]
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return cur
"#,
    )
});

/// Every script, loaded when a fleet opens.
pub(crate) fn all() -> [&'static Script; 4] {
    [&GCRA, &ACQUIRE, &RENEW, &PIN]
}

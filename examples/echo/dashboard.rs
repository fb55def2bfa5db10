//! The live dashboard (a terminal on stdout, no `--no-tui`): ratatui over crossterm, on
//! the alternate screen in raw mode. A row per backend (requests/s with its trend,
//! health now and over the run, pool use, errors), sessions and limiter refusals,
//! p50/p99 latency over time and the latest ejections and readmissions. `q`, Esc or
//! Ctrl-C quits. The terminal is restored on close, on drop and on panic (ratatui's
//! panic hook).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::Duration;

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use marina::StackStats;
use marina::health::Status;
use ratatui::DefaultTerminal;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table};
use tokio::sync::mpsc;

use crate::live::{Event, Live, What, micros, status_text};

/// What one frame shows.
pub(crate) struct View<'a> {
    /// Seconds since the start, and the planned length of the run.
    pub(crate) t: f64,
    pub(crate) duration: f64,
    /// Requests echoed and errors, as the clients saw them.
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    /// One line on the setup: picker, clients.
    pub(crate) setup: &'a str,
    pub(crate) stats: &'a StackStats,
    pub(crate) live: &'a Live,
    pub(crate) events: &'a [Event],
}

/// The terminal, taken over, and a thread reading its keys.
pub(crate) struct Dashboard {
    terminal: DefaultTerminal,
    quit: mpsc::UnboundedReceiver<()>,
    stop: Arc<AtomicBool>,
    keys: Option<thread::JoinHandle<()>>,
    open: bool,
}

impl Dashboard {
    /// Raw mode, alternate screen, and a panic hook that gives the terminal back.
    pub(crate) fn open() -> io::Result<Self> {
        let mut terminal = ratatui::try_init().inspect_err(|_| ratatui::restore())?;
        terminal.hide_cursor().inspect_err(|_| ratatui::restore())?;
        let (tx, quit) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let keys = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("echo-keys".into())
                .spawn(move || read_keys(&stop, &tx))
                .inspect_err(|_| ratatui::restore())?
        };
        Ok(Dashboard {
            terminal,
            quit,
            stop,
            keys: Some(keys),
            open: true,
        })
    }

    pub(crate) fn draw(&mut self, view: &View<'_>) -> io::Result<()> {
        self.terminal.draw(|f| draw(f, view)).map(|_| ())
    }

    /// Resolves when `q`, Esc or Ctrl-C is pressed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a key press not yet seen stays queued.
    pub(crate) async fn quit_pressed(&mut self) {
        if self.quit.recv().await.is_none() {
            // The key reader is gone (the terminal failed): never quit by key.
            std::future::pending::<()>().await;
        }
    }

    /// Gives the terminal back: main screen, cooked mode, cursor shown.
    pub(crate) fn close(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        self.stop.store(true, Relaxed);
        if let Some(keys) = self.keys.take() {
            let _ = keys.join();
        }
        let _ = self.terminal.show_cursor();
        ratatui::restore();
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        self.restore();
    }
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("open", &self.open)
            .finish()
    }
}

fn read_keys(stop: &AtomicBool, quit: &mpsc::UnboundedSender<()>) {
    while !stop.load(Relaxed) {
        match event::poll(Duration::from_millis(100)) {
            Ok(false) => {}
            Ok(true) => match event::read() {
                Ok(TermEvent::Key(k)) if k.kind == KeyEventKind::Press => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        let _ = quit.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            },
            Err(_) => return,
        }
    }
}

const GREEN: Style = Style::new().fg(Color::Green);
const RED: Style = Style::new().fg(Color::Red);
const YELLOW: Style = Style::new().fg(Color::Yellow);
const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);

fn health_style(s: &Status) -> Style {
    match s {
        Status::Healthy => GREEN,
        Status::Degraded => YELLOW,
        Status::Ejected { .. } => RED,
        Status::Unknown => DIM,
    }
}

fn severity(s: &Status) -> u8 {
    match s {
        Status::Healthy => 0,
        Status::Unknown => 1,
        Status::Degraded => 2,
        Status::Ejected { .. } => 3,
    }
}

fn draw(f: &mut Frame<'_>, v: &View<'_>) {
    let n = v.live.addrs.len() as u16;
    let [title, table, limits, p50, p99, events, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(n + 3),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());

    f.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("marina echo", BOLD),
            Span::raw(format!(
                "  t={:.1}s of {:.0}s  ok={}  errors={}  in flight={}  ({})",
                v.t, v.duration, v.ok, v.errors, v.stats.in_flight, v.setup
            )),
        ])),
        title,
    );
    backends(f, table, v);
    f.render_widget(
        Paragraph::new(limits_lines(v.stats)).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" sessions and limits "),
        ),
        limits,
    );
    latency(f, p50, "p50", &v.live.p50, GREEN);
    latency(f, p99, "p99", &v.live.p99, YELLOW);
    let shown = events.height.saturating_sub(2) as usize;
    let notable: Vec<&Event> = v.events.iter().filter(|e| e.notable()).collect();
    let lines: Vec<Line<'_>> = notable
        .iter()
        .skip(notable.len().saturating_sub(shown))
        .map(|e| {
            let style = match &e.what {
                What::Health(_, Status::Ejected { .. }, _) => RED,
                What::Health(Status::Ejected { .. }, ..) => GREEN,
                What::Health(..) => Style::new(),
                What::Demo(_) => YELLOW,
            };
            Line::from(vec![
                Span::styled(format!("{:>6.2}s  ", e.t), DIM),
                Span::styled(e.text(), style),
            ])
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" ejections and readmissions "),
        ),
        events,
    );
    f.render_widget(
        Paragraph::new(Span::styled(
            "q, Esc or Ctrl-C: stop the clients, shut the stack down and print the summary",
            DIM,
        )),
        footer,
    );
}

/// Requests/s trend as block characters, scaled to `max`.
fn spark(data: impl Iterator<Item = u64>, max: u64) -> String {
    const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    data.map(|v| {
        if v == 0 || max == 0 {
            ' '
        } else {
            BARS[(v * 8).div_ceil(max).clamp(1, 8) as usize]
        }
    })
    .collect()
}

/// The health of `addr` over the run, one cell per `duration / width`: the worst
/// state seen in each cell's span; blank ahead of now.
fn health_strip(addr: SocketAddr, v: &View<'_>, width: usize) -> Line<'static> {
    let changes: Vec<(f64, Status)> = v
        .events
        .iter()
        .filter(|e| e.addr == addr)
        .filter_map(|e| match e.what {
            What::Health(_, to, _) => Some((e.t, to)),
            What::Demo(_) => None,
        })
        .collect();
    let slot = v.duration.max(v.t) / width.max(1) as f64;
    let mut spans = Vec::with_capacity(width);
    for j in 0..width {
        let (a, b) = (j as f64 * slot, (j + 1) as f64 * slot);
        if a > v.t {
            spans.push(Span::raw(" "));
            continue;
        }
        let at_start = changes
            .iter()
            .rev()
            .find(|(t, _)| *t <= a)
            .map_or(Status::Unknown, |c| c.1);
        let worst = changes
            .iter()
            .filter(|(t, _)| *t > a && *t < b)
            .map(|c| c.1)
            .fold(
                at_start,
                |w, s| if severity(&s) > severity(&w) { s } else { w },
            );
        let (ch, style) = match worst {
            Status::Healthy => ("─", GREEN),
            Status::Degraded => ("▒", YELLOW),
            Status::Ejected { .. } => ("█", RED),
            Status::Unknown => ("·", DIM),
        };
        spans.push(Span::styled(ch, style));
    }
    Line::from(spans)
}

fn backends(f: &mut Frame<'_>, area: Rect, v: &View<'_>) {
    const TREND: usize = 24;
    let fixed = [21u16, 7, TREND as u16, 20, 16, 7, 9];
    let spacing = fixed.len() as u16; // one column between each of the 8
    let strip = area
        .width
        .saturating_sub(2 + spacing + fixed.iter().sum::<u16>())
        .clamp(8, 80) as usize;
    let max_rate = v
        .live
        .rates
        .iter()
        .flat_map(|r| r.iter().rev().take(TREND))
        .copied()
        .max()
        .unwrap_or(0);
    let rows = v.live.addrs.iter().enumerate().map(|(i, addr)| {
        let b = v.stats.backends.iter().find(|b| b.addr == *addr);
        let rates = &v.live.rates[i];
        let now = rates.back().copied().unwrap_or(0);
        let trend = spark(
            std::iter::repeat_n(0, TREND.saturating_sub(rates.len())).chain(
                rates
                    .iter()
                    .skip(rates.len().saturating_sub(TREND))
                    .copied(),
            ),
            max_rate,
        );
        let health = b.and_then(|b| b.health);
        let (health_text, health_style) = health.map_or(("off".to_string(), DIM), |s| {
            (status_text(&s), health_style(&s))
        });
        let pool = b.map_or("-".to_string(), |b| {
            format!("{}/{}/{}", b.pool.active, b.pool.idle, b.pool.max_size)
        });
        let bal = b.and_then(|b| b.balance.as_ref());
        let errors = bal.map_or(0, |e| e.errors);
        Row::new(vec![
            Cell::from(addr.to_string()),
            Cell::from(format!("{now:>7}")),
            Cell::from(Span::styled(trend, Style::new().fg(Color::Cyan))),
            Cell::from(Span::styled(health_text, health_style)),
            Cell::from(health_strip(*addr, v, strip)),
            Cell::from(format!("{pool:>16}")),
            Cell::from(Span::styled(
                format!("{errors:>7}"),
                if errors > 0 { RED } else { Style::new() },
            )),
            Cell::from(format!("{:>9}", bal.map_or(0, |e| e.in_flight))),
        ])
    });
    let header = Row::new(vec![
        "backend",
        "  req/s",
        "trend",
        "health",
        "health over the run",
        " in use/idle/max",
        " errors",
        "in flight",
    ])
    .style(BOLD);
    let widths = [
        Constraint::Length(fixed[0]),
        Constraint::Length(fixed[1]),
        Constraint::Length(fixed[2]),
        Constraint::Length(fixed[3]),
        Constraint::Length(strip as u16),
        Constraint::Length(fixed[4]),
        Constraint::Length(fixed[5]),
        Constraint::Length(fixed[6]),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(" backends ")),
        area,
    );
}

fn limits_lines(s: &StackStats) -> Vec<Line<'static>> {
    let mut parts = Vec::new();
    if let Some(a) = &s.affinity {
        parts.push(format!(
            "sessions: {} live, {} created, {} repinned, {} refused",
            a.sessions, a.created, a.repinned, a.refused
        ));
    }
    for c in &s.concurrency {
        parts.push(format!(
            "per-client limit {}: {} in flight, {} refused",
            c.limit, c.in_flight, c.rejected
        ));
    }
    let first = parts.join("  │  ");
    parts.clear();
    match &s.rate {
        Some(r) => parts.push(format!(
            "rate limit: {} admitted, {} refused",
            r.admitted, r.rejected
        )),
        None => parts.push("rate limit: none".into()),
    }
    parts.push(format!(
        "failover: {} retries, {} endpoint errors",
        s.balance.retries, s.balance.errors
    ));
    vec![Line::from(first), Line::from(parts.join("  │  "))]
}

fn latency(
    f: &mut Frame<'_>,
    area: Rect,
    name: &str,
    data: &std::collections::VecDeque<u64>,
    style: Style,
) {
    let width = area.width.saturating_sub(2) as usize;
    let tail: Vec<u64> = data
        .iter()
        .skip(data.len().saturating_sub(width))
        .copied()
        .collect();
    let now = tail.iter().rev().find(|v| **v > 0).copied().unwrap_or(0);
    let peak = tail.iter().copied().max().unwrap_or(0);
    f.render_widget(
        Sparkline::default().data(&tail).style(style).block(
            Block::default().borders(Borders::ALL).title(format!(
                " {name} latency: {} now, {} peak on screen ",
                micros(now),
                micros(peak)
            )),
        ),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::spark;

    #[test]
    fn spark_scales_to_the_max() {
        assert_eq!(spark([0, 1, 4, 8].into_iter(), 8), " ▁▄█");
        assert_eq!(spark([5, 5].into_iter(), 0), "  ");
    }
}

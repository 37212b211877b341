//! `iopath top`'s terminal: ratatui on crossterm, redrawn on each tick and key. The terminal
//! is put back as it was (main screen, cooked mode, cursor) on every way out: `q`, Esc,
//! Ctrl-C, an error, a panic (ratatui's hook).

use std::{
    sync::atomic::{AtomicBool, Ordering as AtomicOrdering},
    time::{Duration, Instant},
};

use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Row, Table},
};

use crate::{
    report::us,
    session::Session,
    top::{self, Top},
};

/// How often what is gone is collected, at most.
const COLLECT_EVERY: Duration = Duration::from_secs(1);
/// How often the kernel's notices of new VMs are read between ticks (and a signal noticed).
const NOTICES_EVERY: Duration = Duration::from_millis(20);
/// Fixed columns: VM, STAGE (the longest name), RATE/s, P50, P99, MAX (wide enough for
/// "17179.9ms", the overflow bucket); the trend takes the rest (7 at 80 columns).
const WIDTHS: [u16; 6] = [11, 22, 7, 9, 9, 9];

/// Runs until the user quits; the session is read every `tick`.
pub fn run(session: &mut Session, tick: Duration) -> anyhow::Result<()> {
    // SIGTERM, SIGHUP (the SSH session gone) and a SIGINT sent by kill end it like `q`: raw
    // mode and the alternate screen are undone below, not left to the next shell.
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // Log lines on stderr would scribble over the screen; warnings go unseen meanwhile.
    let level = log::max_level();
    log::set_max_level(log::LevelFilter::Off);
    let mut terminal = ratatui::init();
    let result = run_loop(&mut terminal, session, tick);
    ratatui::restore();
    log::set_max_level(level);
    result
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, AtomicOrdering::Relaxed);
}

fn run_loop(
    terminal: &mut DefaultTerminal,
    session: &mut Session,
    tick: Duration,
) -> anyhow::Result<()> {
    let mut top = Top::new(tick.as_secs_f64());
    let mut next = Instant::now();
    let (mut updated, mut collected) = (Instant::now(), Instant::now());
    // drawn on a tick, a key or a resize only
    let mut dirty = true;
    loop {
        if SIGNALLED.load(AtomicOrdering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= next {
            session.drain_notices();
            // collection walks every growing map: once a second at most, as the daemon
            if collected.elapsed() >= COLLECT_EVERY {
                session.collect()?;
                collected = Instant::now();
            }
            session.watch()?;
            session.refresh()?;
            top.update(&session.labelled(true), updated.elapsed().as_secs_f64());
            updated = Instant::now();
            next += tick;
            // a machine that fell behind (suspended, say) starts afresh rather than catch up
            if next < Instant::now() {
                next = Instant::now() + tick;
            }
            dirty = true;
        }
        if dirty {
            terminal.draw(|f| draw(f, &top))?;
            dirty = false;
        }
        // New VMs are named as the kernel tells of them, between ticks too: one that exits
        // within a tick keeps its name.
        session.drain_notices();
        let wait = next.saturating_duration_since(Instant::now());
        if !event::poll(wait.min(NOTICES_EVERY))? {
            continue;
        }
        let k = match event::read()? {
            Event::Key(k) if k.kind == KeyEventKind::Press => k,
            Event::Resize(..) => {
                dirty = true;
                continue;
            }
            _ => continue,
        };
        dirty = true;
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            // raw mode: Ctrl-C is a key, not SIGINT
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('s') => top.next_sort(),
            KeyCode::Char('r') => top.reversed = !top.reversed,
            KeyCode::Char('v') => top.next_vm(),
            KeyCode::Char('p') => top.next_path(),
            _ => dirty = false,
        }
    }
}

fn draw(f: &mut Frame, top: &Top) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let rows = top.rows();
    let order = if top.reversed {
        "ascending"
    } else {
        "top first"
    };
    f.render_widget(
        Line::from(format!(
            "iopath top  sort {} ({order})  vm {}  path {}  {} rows",
            top.sort.name(),
            top.vm.as_deref().unwrap_or("all"),
            top.path.unwrap_or("all"),
            rows.len()
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    // the trend column: what is left after the fixed ones and their spacing
    let fixed: u16 = WIDTHS.iter().sum::<u16>() + WIDTHS.len() as u16;
    let trend_w = body.width.saturating_sub(fixed).max(1);
    let lat = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |ns| us(ns / 1e3));
    let table_rows = rows.iter().map(|r| {
        Row::new([
            Cell::from(fit(&r.key.vm, WIDTHS[0] as usize)),
            Cell::from(r.key.stage),
            Cell::from(Line::from(format!("{:.0}", r.rate)).right_aligned()),
            Cell::from(Line::from(lat(r.p50_ns)).right_aligned()),
            Cell::from(Line::from(lat(r.p99_ns)).right_aligned()),
            Cell::from(Line::from(lat(r.max_ns)).right_aligned()),
            Cell::from(top::sparkline(&r.trend, trend_w as usize)),
        ])
    });
    let header = Row::new([
        "VM", "STAGE", "RATE/s", "P50 us", "P99 us", "MAX us", "TREND",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let mut widths: Vec<Constraint> = WIDTHS.iter().map(|w| Constraint::Length(*w)).collect();
    widths.push(Constraint::Min(1));
    f.render_widget(Table::new(table_rows, widths).header(header), body);
    f.render_widget(
        Line::from(format!(
            "q quit  s sort  r reverse  v vm  p path  {} s window  trend: p99",
            top.window_secs()
        )),
        foot,
    );
}

/// `name` in at most `width` characters: cut with an ellipsis, so two long names that differ
/// at the end do not look the same without saying they were cut.
fn fit(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        return name.to_string();
    }
    let mut cut: String = name.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

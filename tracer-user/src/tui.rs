//! `iopath top`'s terminal: ratatui on crossterm, redrawn on each tick and key. The terminal
//! is put back as it was (main screen, cooked mode, cursor) on every way out: `q`, Esc,
//! Ctrl-C, an error, a panic (ratatui's hook).

use std::time::{Duration, Instant};

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

/// How often the kernel's notices of new VMs are read between ticks.
const NOTICES_EVERY: Duration = Duration::from_millis(20);
/// Fixed columns: VM, STAGE, RATE/s, P50, P99, MAX; the trend takes the rest.
const WIDTHS: [u16; 6] = [12, 22, 7, 8, 8, 8];

/// Runs until the user quits; the session is read every `tick`.
pub fn run(session: &mut Session, tick: Duration) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let result = run_loop(&mut terminal, session, tick);
    ratatui::restore();
    result
}

fn run_loop(
    terminal: &mut DefaultTerminal,
    session: &mut Session,
    tick: Duration,
) -> anyhow::Result<()> {
    let mut top = Top::new(tick.as_secs_f64());
    let mut next = Instant::now();
    // drawn on a tick, a key or a resize only
    let mut dirty = true;
    loop {
        if Instant::now() >= next {
            session.drain_notices();
            session.collect()?;
            session.watch_backends()?;
            session.learn_signals();
            session.watch_vfio_irqs();
            session.refresh()?;
            top.update(&session.labelled(true));
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
            Cell::from(r.key.vm.clone()),
            Cell::from(r.key.stage),
            Cell::from(Line::from(format!("{:.0}", r.rate)).right_aligned()),
            Cell::from(Line::from(lat(r.p50_ns)).right_aligned()),
            Cell::from(Line::from(lat(r.p99_ns)).right_aligned()),
            Cell::from(Line::from(lat(r.max_ns)).right_aligned()),
            Cell::from(top::sparkline(&r.trend, trend_w as usize)),
        ])
    });
    let header = Row::new([
        "VM",
        "STAGE",
        "RATE/s",
        "P50 us",
        "P99 us",
        "MAX us",
        "P99 TREND",
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let mut widths: Vec<Constraint> = WIDTHS.iter().map(|w| Constraint::Length(*w)).collect();
    widths.push(Constraint::Min(1));
    f.render_widget(Table::new(table_rows, widths).header(header), body);
    f.render_widget(
        Line::from(format!(
            "q quit  s sort  r reverse  v vm  p path   quantiles over {} s",
            top.window_secs()
        )),
        foot,
    );
}

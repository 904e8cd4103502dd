//! How results look: the output formats (`-o text|json|yaml`), the normative flush lines,
//! the one table renderer every table goes through, the status view, YAML documents, errors.

use std::fmt::Write as _;

use murmur_workflows::error::ApiError;
use serde::Serialize;

use murmur_workflows::agent::{AgentStatus, Phase};
use murmur_workflows::model::{Millis, ResourceDoc};
use murmur_workflows::status::PoolStatus;

/// How a command prints what it answers (`-o, --output`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// For people: tables and `key: value` lines (for `get`, YAML).
    #[default]
    Text,
    /// One JSON document (pretty-printed; one line per document when watching).
    Json,
    /// One YAML document.
    Yaml,
}

/// A value that cannot be rendered in the format asked for.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// serde_json refused the value.
    #[error("cannot render as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// serde_norway refused the value.
    #[error("cannot render as YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

impl From<RenderError> for ApiError {
    fn from(e: RenderError) -> Self {
        ApiError::new(murmur_workflows::error::Code::Internal, e.to_string())
    }
}

impl Format {
    /// True for the machine formats (JSON, YAML).
    pub fn is_structured(self) -> bool {
        self != Format::Text
    }

    /// `value` as a document of this format, ending in a newline: pretty JSON for `Json`,
    /// YAML for `Yaml` and `Text` (callers print their own text forms).
    pub fn document<T: Serialize + ?Sized>(self, value: &T) -> Result<String, RenderError> {
        Ok(match self {
            Format::Json => serde_json::to_string_pretty(value)? + "\n",
            Format::Yaml | Format::Text => serde_norway::to_string(value)?,
        })
    }

    /// `value` as one line of JSON, or (YAML, text) a YAML document that starts with `---`:
    /// what a watch prints per change.
    pub fn stream_item<T: Serialize + ?Sized>(self, value: &T) -> Result<String, RenderError> {
        Ok(match self {
            Format::Json => serde_json::to_string(value)? + "\n",
            Format::Yaml | Format::Text => format!("---\n{}", serde_norway::to_string(value)?),
        })
    }
}

/// An error as a document: what `-o json` / `-o yaml` print on stderr.
#[derive(Debug, Serialize)]
struct ErrorDoc<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<&'a str>,
}

/// What stderr shows for a failed operation: `CODE: reason` plus the hint line for text;
/// `{"code", "message", "hint"}` as one JSON line or as a YAML mapping otherwise.
pub fn error_text(e: &ApiError, hint: Option<&str>, format: Format) -> String {
    let doc = ErrorDoc {
        code: e.code.as_str(),
        message: &e.message,
        hint,
    };
    let structured = match format {
        Format::Text => None,
        Format::Json => serde_json::to_string(&doc).ok().map(|t| t + "\n"),
        Format::Yaml => serde_norway::to_string(&doc).ok(),
    };
    structured.unwrap_or_else(|| match hint {
        Some(h) => format!("{e}\n{h}\n"),
        None => format!("{e}\n"),
    })
}

/// The one table renderer: a header row and rows, no borders, columns left-aligned and
/// separated by `gap` spaces, cells never truncated or wrapped, no trailing blanks, no
/// colour. Renders nothing at all when there are no rows.
pub fn table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>], gap: u16) -> String {
    use comfy_table::{CellAlignment, ContentArrangement, Table, presets::NOTHING};
    if rows.is_empty() {
        return String::new();
    }
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row.iter().map(AsRef::as_ref).collect::<Vec<&str>>());
    }
    let last = header.len().saturating_sub(1);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, if i < last { gap } else { 0 }));
        column.set_cell_alignment(CellAlignment::Left);
    }
    t.lines().map(|l| l.trim_end().to_string() + "\n").collect()
}

/// First line of a flush.
pub const FLUSH_START: &str = "Flushing warm VMs...";

/// The flush result line.
pub fn flush_result(flushed: u32) -> String {
    match flushed {
        0 => "No warm VMs to flush".to_string(),
        1 => "Flushed 1 warm VM \u{2014} pool will replenish with fresh ones".to_string(),
        n => format!("Flushed {n} warm VMs \u{2014} pool will replenish with fresh ones"),
    }
}

/// First line of a nuke.
pub const NUKE_START: &str = "Nuking all workflows and VMs...";

/// The nuke result line.
pub fn nuke_result(total: u64) -> String {
    format!("Nuke complete ({total} terminated/deleted)")
}

/// What `murmur spawn` prints.
pub fn spawned(slug: &str) -> String {
    format!(
        "Spawned: {slug}\n\n  To get the status of the task:                murmur status {slug}\n  To kill the task:                             murmur kill {slug}\n"
    )
}

/// `murmur status <slug>`: `key: value` lines, keys padded to 10 columns, only the fields
/// that have a value.
pub fn agent_status(st: &AgentStatus) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let mut lines = value.lines();
        let first = lines.next().unwrap_or("");
        let label = format!("{key}:");
        let width = label.len().max(9) + 1;
        let _ = writeln!(out, "{label:<width$}{first}");
        for more in lines {
            let _ = writeln!(out, "{:<10}{more}", "");
        }
    };
    line("workflow", &st.workflow);
    line("phase", st.phase.map_or("PHASE_STARTING", Phase::as_str));
    if let Some(vm) = &st.vm {
        let stopped = if st.asleep { " [stopped]" } else { "" };
        line("vm", &format!("{vm}{stopped}"));
        // Where to read the agent's output: following while it runs, whole once it ended.
        let ended = st.phase.is_some_and(Phase::is_terminal);
        let follow = if ended { "" } else { "-f " };
        line("logs", &format!("murmur logs {follow}{}", st.slug));
    }
    if let Some(p) = st.queue_position {
        line("queued", &format!("waiting for a VM (position {p})"));
    }
    line("command", &st.command.join(" "));
    line("on-idle", st.on_idle.as_str());
    if let Some(code) = st.exit_code {
        line("exit code", &code.to_string());
    }
    if let Some(e) = &st.error {
        line("error", e);
    }
    if let Some(tail) = &st.output_tail
        && !tail.trim().is_empty()
    {
        line("output", tail.trim_end());
    }
    out
}

/// `murmur ls`: a `SLUG PHASE VM` table (`DEVELOPER SLUG PHASE VM` with `developers`);
/// nothing at all when there are no agents.
pub fn agent_table(rows: &[crate::agents::AgentRow], developers: bool) -> String {
    let mut header = vec!["SLUG", "PHASE", "VM"];
    if developers {
        header.insert(0, "DEVELOPER");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.slug.clone(),
                r.phase.clone(),
                r.vm.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            ];
            if developers {
                row.insert(0, r.developer.clone());
            }
            row
        })
        .collect();
    table(&header, &cells, 3)
}

/// A duration as `850ms`, `42s`, `3m10s`, `2h5m`, `3d4h`.
pub fn human_duration(ms: Millis) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The human status view.
pub fn status_table(st: &PoolStatus, now: Millis) -> String {
    let mut out = String::new();
    if let Some(how) = &st.run_ended {
        let _ = writeln!(
            out,
            "NOT RUNNING: the pool's last run ended ({how}); below is its last state. Nothing hands out, backfills or deletes VMs until `murmur pool up` starts a new run, which recovers the pool."
        );
    }
    let _ = writeln!(
        out,
        "Pool pool/{}  generation {}  {} of {} VMs in use{}{}",
        st.tenant,
        st.generation,
        st.in_use,
        st.config.max_vms,
        if st.flush_in_progress {
            "  [flush in progress]"
        } else {
            ""
        },
        if st.nuke_in_progress {
            "  [nuke in progress]"
        } else {
            ""
        },
    );
    let _ = writeln!(
        out,
        "Config: max_vms={} max_agents_per_developer={} reap_stranded_workflows={} (generation {})",
        st.config.max_vms,
        st.config.max_agents_per_developer,
        st.config.reap_stranded_workflows.as_str(),
        st.config_generation
    );
    if let Some(r) = &st.recovery {
        let _ = writeln!(out, "{}", recovery_line(r));
    }
    if st.workspaces.is_empty() {
        if st.recovery.as_ref().is_none_or(|r| r.config_read) {
            let _ = writeln!(
                out,
                "No workspaces yet: create one with murmur set workspace <name>"
            );
        }
        return out;
    }
    let header = [
        "WORKSPACE",
        "IMAGE",
        "GEN",
        "WARM",
        "BOOTING",
        "ASSIGNED",
        "DELETING",
        "OLDEST WARM",
        "BOOT FAILURES",
        "STATUS",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for ws in &st.workspaces {
        let oldest = ws
            .oldest_warm_since
            .map(|t| human_duration(now.saturating_sub(t)))
            .unwrap_or_else(|| "-".into());
        let status = if ws.reasons.is_empty() {
            if ws.ready >= ws.min_idle {
                format!("ok ({}/{} ready)", ws.ready, ws.min_idle)
            } else {
                format!("filling ({}/{} ready)", ws.ready, ws.min_idle)
            }
        } else {
            ws.reasons.join(",")
        };
        if ws.groups.is_empty() {
            rows.push(vec![
                ws.name.clone(),
                ws.image_ref.clone(),
                st.generation.to_string(),
                "0".into(),
                "0".into(),
                "0".into(),
                "0".into(),
                oldest,
                ws.boot_failures.to_string(),
                status,
            ]);
            continue;
        }
        for g in &ws.groups {
            rows.push(vec![
                ws.name.clone(),
                g.image.clone(),
                g.generation.to_string(),
                g.warm.to_string(),
                g.booting.to_string(),
                g.assigned.to_string(),
                g.deleting.to_string(),
                oldest.clone(),
                ws.boot_failures.to_string(),
                status.clone(),
            ]);
        }
    }
    out.push_str(&table(&header, &rows, 2));
    let mut facts = vec![format!(
        "last reconcile {} ago",
        human_duration(now.saturating_sub(st.last_reconcile_at))
    )];
    if let Some(ms) = st.last_flush_ms {
        facts.push(format!("last flush took {}", human_duration(ms)));
    }
    if !st.accel.is_empty() {
        facts.push(format!("VMs run with {}", st.accel));
    }
    if st.nukes > 0 {
        facts.push(format!(
            "{} nuke(s), the last took {}",
            st.nukes,
            human_duration(st.last_nuke_ms.unwrap_or(0))
        ));
    }
    if !st.denials.is_empty() {
        facts.push(format!(
            "{} refused request(s), see -o json .denials",
            st.denials.len()
        ));
    }
    let _ = writeln!(out, "{}", facts.join("; "));
    if st.claims_total > 0 {
        let _ = writeln!(
            out,
            "Agents: {} holding or booting a VM, {} waiting for room under max_vms",
            st.claims_total.saturating_sub(st.claims_waiting),
            st.claims_waiting
        );
    }
    if st.dormant > 0 {
        let _ = writeln!(
            out,
            "Asleep: {} VM(s) saved to disk, holding no host memory (not in use){}",
            st.dormant,
            if st.wakes_waiting > 0 {
                format!(
                    "; {} waiting for room under max_vms to wake",
                    st.wakes_waiting
                )
            } else {
                String::new()
            }
        );
    }
    if st.stuck_deleting_total > 0 {
        let _ = writeln!(
            out,
            "Stuck deleting: {} VM(s) whose delete keeps failing (they count against max_vms; retried with back-off):",
            st.stuck_deleting_total
        );
        for v in st.stuck_deleting.iter().take(5) {
            let _ = writeln!(
                out,
                "  {} on {}: {} failure(s), last: {}",
                v.id,
                v.host.as_deref().unwrap_or("-"),
                v.failures,
                v.error
            );
        }
    }
    if !st.hosts.is_empty() {
        let hosts: Vec<String> = st
            .hosts
            .iter()
            .map(|h| format!("{} {} {}/{}", h.host, h.state, h.vms, h.max_vms))
            .collect();
        let mut line = format!("Hosts (this pool's VMs/capacity): {}", hosts.join(", "));
        if st.counters.written_off > 0 {
            line.push_str(&format!(
                "; {} VM(s) written off with lost hosts",
                st.counters.written_off
            ));
        }
        let _ = writeln!(out, "{line}");
    }
    if let Some(at) = st.reaper.last_scan_at {
        let r = &st.reaper;
        let _ = writeln!(
            out,
            "Reaper: last scan {} ago; {} orphan(s) deleted, {} dead VM(s) replaced, {} claim(s) \
             of ended agents released, {} unknown VM(s) in their grace period; stranded agent \
             workflows: {} now, {} terminated; {} pause(s) of dead nukes resumed",
            human_duration(now.saturating_sub(at)),
            r.orphans_deleted,
            r.dead_vms_replaced,
            r.agent_claims_released,
            r.suspects,
            r.stranded_found,
            r.stranded_terminated,
            r.abandoned_nukes
        );
    }
    for (image, h) in &st.failing_images {
        let _ = writeln!(
            out,
            "Image {image}: {} consecutive boot failures{}: {}",
            h.consecutive_failures,
            if h.backoff_until.is_some() {
                ", backfill held back"
            } else {
                ""
            },
            h.last_error.as_deref().unwrap_or("unknown error")
        );
    }
    out
}

/// The line saying how a recovery goes.
pub fn recovery_line(r: &murmur_workflows::machine::Recovery) -> String {
    if !r.config_read {
        return "Recovering: reading the config the previous run left (the config below is not the tenant's yet)".to_string();
    }
    format!(
        "Recovering: config from {}; {} round(s) over the hosts: {} VM(s) of running agents and {} warm VM(s) adopted, {} deleted (nobody owned them); nothing boots until it is done",
        r.config_source, r.rounds, r.adopted_assigned, r.adopted_warm, r.deleted
    )
}

/// A resource as the YAML `murmur get` prints and `murmur set` accepts.
pub fn resource_yaml(doc: &ResourceDoc) -> String {
    serde_norway::to_string(doc).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_lines_are_the_normative_ones() {
        assert_eq!(flush_result(0), "No warm VMs to flush");
        assert_eq!(
            flush_result(1),
            "Flushed 1 warm VM — pool will replenish with fresh ones"
        );
        assert_eq!(
            flush_result(3),
            "Flushed 3 warm VMs — pool will replenish with fresh ones"
        );
    }

    #[test]
    fn agent_status_aligns_values_at_column_eleven() {
        let st = AgentStatus {
            workflow: "agent/acme/web/ana/fix".into(),
            slug: "fix".into(),
            phase: Some(Phase::Canceled),
            command: vec!["sleep 60".into()],
            exit_code: Some(143),
            output_tail: Some("one\ntwo\n".into()),
            ..Default::default()
        };
        let text = agent_status(&st);
        assert!(text.starts_with("workflow: agent/acme/web/ana/fix\nphase:    PHASE_CANCELED\n"));
        assert!(text.contains("exit code: 143\n"));
        assert!(text.ends_with("output:   one\n          two\n"), "{text}");
        assert!(!text.contains("vm:"));
    }

    #[test]
    fn status_table_shows_groups_reasons_and_what_happened_last() {
        use murmur_workflows::status::{GroupStatus, WorkspaceStatus};
        let st = PoolStatus {
            tenant: "acme".into(),
            generation: 4,
            in_use: 5,
            config: murmur_workflows::model::PoolConfigSpec::default(),
            config_generation: 2,
            workspaces: vec![WorkspaceStatus {
                name: "web".into(),
                min_idle: 3,
                image_ref: "img-2".into(),
                config_generation: 1,
                ready: 2,
                groups: vec![GroupStatus {
                    image: "img-2".into(),
                    generation: 4,
                    warm: 2,
                    booting: 1,
                    assigned: 2,
                    deleting: 0,
                }],
                oldest_warm_since: Some(40_000),
                boot_failures: 0,
                reasons: vec!["flush_in_progress".into()],
            }],
            flush_in_progress: true,
            last_reconcile_at: 99_000,
            last_flush_ms: Some(850),
            ..Default::default()
        };
        let text = status_table(&st, 100_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "Pool pool/acme  generation 4  5 of 10 VMs in use  [flush in progress]"
        );
        assert!(lines[2].starts_with("WORKSPACE  IMAGE  GEN  WARM  BOOTING  ASSIGNED"));
        assert!(lines[3].starts_with("web        img-2  4    2     1        2         0"));
        assert!(
            lines[3].ends_with("1m0s         0              flush_in_progress"),
            "{}",
            lines[3]
        );
        assert_eq!(lines[4], "last reconcile 1s ago; last flush took 850ms");
    }

    #[test]
    fn empty_agent_list_prints_nothing() {
        assert_eq!(agent_table(&[], false), "");
        assert_eq!(agent_table(&[], true), "");
        assert_eq!(nuke_result(8), "Nuke complete (8 terminated/deleted)");
    }

    #[test]
    fn tables_are_left_aligned_untruncated_and_plain() {
        let host = "h".repeat(63);
        let text = table(
            &["HOST", "STATE", "VMS"],
            &[
                vec![host.clone(), "live".into(), "12".into()],
                vec!["w-2".into(), "lost".into(), "0".into()],
            ],
            3,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("{:<66}STATE   VMS", "HOST"));
        assert_eq!(lines[1], format!("{host}   live    12"));
        assert_eq!(lines[2], format!("{:<66}lost    0", "w-2"));
        assert!(!text.contains('\x1b'), "no escape codes: {text:?}");
        assert!(text.lines().all(|l| l == l.trim_end()));
        assert_eq!(table::<String>(&["A"], &[], 2), "");
    }

    #[test]
    fn agent_table_has_a_developer_column_for_every_developer() {
        let row = |developer: &str, slug: &str| crate::agents::AgentRow {
            slug: slug.into(),
            developer: developer.into(),
            phase: "running".into(),
            vm: None,
            workflow: format!("agent/t/w/{developer}/{slug}"),
        };
        let rows = [row("ana", "fix"), row("bob.smith", "build")];
        assert_eq!(
            agent_table(&rows, false),
            "SLUG    PHASE     VM\nfix     running\nbuild   running\n"
        );
        assert_eq!(
            agent_table(&rows, true),
            "DEVELOPER   SLUG    PHASE     VM\nana         fix     running\nbob.smith   build   running\n"
        );
    }

    #[test]
    fn errors_render_in_each_format() {
        let e = ApiError::not_found("agent x does not exist");
        assert_eq!(
            error_text(&e, Some("try ls"), Format::Text),
            "NOT_FOUND: agent x does not exist\ntry ls\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&error_text(&e, Some("try ls"), Format::Json)).unwrap();
        assert_eq!(json["code"], "NOT_FOUND");
        assert_eq!(json["message"], "agent x does not exist");
        assert_eq!(json["hint"], "try ls");
        let yaml: serde_json::Value =
            serde_norway::from_str(&error_text(&e, None, Format::Yaml)).unwrap();
        assert_eq!(yaml["code"], "NOT_FOUND");
        assert!(yaml.get("hint").is_none());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(42_000), "42s");
        assert_eq!(human_duration(190_000), "3m10s");
        assert_eq!(human_duration(7_500_000), "2h5m");
    }
}

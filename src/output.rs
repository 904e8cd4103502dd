//! How results look on a terminal: the normative flush lines, the status table, YAML
//! documents.

use std::fmt::Write as _;

use murmur_workflows::agent::{AgentStatus, Phase};
use murmur_workflows::model::{Millis, ResourceDoc};
use murmur_workflows::status::PoolStatus;

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
        line("vm", &vm.to_string());
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

/// `murmur ls`: a `SLUG PHASE VM` table; nothing at all when there are no agents.
pub fn agent_table(rows: &[crate::agents::AgentRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut table = vec![["SLUG".to_string(), "PHASE".into(), "VM".into()]];
    for r in rows {
        table.push([
            r.slug.clone(),
            r.phase.clone(),
            r.vm.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        ]);
    }
    let w0 = table.iter().map(|r| r[0].len()).max().unwrap_or(0);
    let w1 = table.iter().map(|r| r[1].len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in table {
        let _ = writeln!(out, "{:<w0$}   {:<w1$}   {}", r[0], r[1], r[2]);
    }
    out.lines()
        .map(|l| l.trim_end().to_string() + "\n")
        .collect()
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
    let mut rows = vec![[
        "WORKSPACE".to_string(),
        "IMAGE".into(),
        "GEN".into(),
        "WARM".into(),
        "BOOTING".into(),
        "ASSIGNED".into(),
        "DELETING".into(),
        "OLDEST WARM".into(),
        "BOOT FAILURES".into(),
        "STATUS".into(),
    ]];
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
            rows.push([
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
            rows.push([
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
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
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
            "{} refused request(s), see --json .denials",
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
        assert_eq!(agent_table(&[]), "");
        assert_eq!(nuke_result(8), "Nuke complete (8 terminated/deleted)");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(42_000), "42s");
        assert_eq!(human_duration(190_000), "3m10s");
        assert_eq!(human_duration(7_500_000), "2h5m");
    }
}

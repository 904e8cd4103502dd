//! How results look on a terminal: the normative flush lines, the status table, YAML
//! documents.

use std::fmt::Write as _;

use murmur_workflows::model::{Millis, ResourceDoc};
use murmur_workflows::status::PoolStatus;

/// First line of a flush.
pub const FLUSH_START: &str = "Flushing warm VMs...";

/// The flush result line (PRODUCT.md §6).
pub fn flush_result(flushed: u32) -> String {
    match flushed {
        0 => "No warm VMs to flush".to_string(),
        1 => "Flushed 1 warm VM \u{2014} pool will replenish with fresh ones".to_string(),
        n => format!("Flushed {n} warm VMs \u{2014} pool will replenish with fresh ones"),
    }
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
    if st.workspaces.is_empty() {
        let _ = writeln!(
            out,
            "No workspaces yet: create one with murmur set workspace <name>"
        );
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
    fn durations_read_naturally() {
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(42_000), "42s");
        assert_eq!(human_duration(190_000), "3m10s");
        assert_eq!(human_duration(7_500_000), "2h5m");
    }
}

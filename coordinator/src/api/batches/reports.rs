//! The batch's report: one line per user, as JSON and as CSV (cells a spreadsheet
//! would run as formulas defused).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use mailferry_shared::redis::control::now_ms;
use serde::Serialize;

use super::*;
use crate::api::{ApiError, Json, Path, Shared, Tenant};

#[derive(Serialize)]
pub struct Report {
    batch: BatchView,
    generated_ms: u64,
    summary: SummaryView,
    users: Vec<UserView>,
}

async fn report(api: &Shared, tenant: &str, id: &str) -> Result<Report, ApiError> {
    let (record, owner) = owned(api, tenant, id).await?;
    let (lines, _) = api.cluster.status(id).await?;
    Ok(Report {
        batch: view(api, id, &record, &owner),
        generated_ms: now_ms(),
        summary: summary_view(&lines),
        users: lines.iter().map(user_view).collect(),
    })
}

fn attachment(name: String) -> (header::HeaderName, String) {
    (
        header::CONTENT_DISPOSITION,
        format!("attachment; filename=\"{name}\""),
    )
}

pub async fn report_json(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report(&api, &tenant, &id).await?;
    Ok(([attachment(format!("mailferry-{id}.json"))], Json(report)).into_response())
}

/// The report as CSV: one row per user (RFC 4180 quoting; times in RFC 3339, UTC).
pub async fn report_csv(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report(&api, &tenant, &id).await?;
    let mut out = String::from(
        "user,status,reason,copied,copied_bytes,skipped,folder_jobs_done,folder_jobs,pass,last_synced\r\n",
    );
    for u in &report.users {
        let row = [
            u.id.clone(),
            u.status.to_string(),
            u.reason.clone().unwrap_or_default(),
            u.copied.to_string(),
            u.copied_bytes.to_string(),
            u.skipped.to_string(),
            u.jobs_done.to_string(),
            u.jobs.to_string(),
            u.pass.to_string(),
            u.last_synced_ms.map(rfc3339).unwrap_or_default(),
        ];
        let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            attachment(format!("mailferry-{id}.csv")),
        ],
        out,
    )
        .into_response())
}

/// A CSV cell, quoted when it must be; a cell a spreadsheet would run as a formula
/// (`=`, `+`, `-`, `@`, or a tab or carriage return before one: OWASP's list) is
/// prefixed with `'`.
fn csv_cell(text: &str) -> String {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let text = if formula && text.parse::<f64>().is_err() {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = mailferry_shared::domain::date::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_cell("-5"), "-5");
        assert_eq!(csv_cell("\t=1+1"), "'\t=1+1");
        assert_eq!(csv_cell("\r=1+1"), "\"'\r=1+1\"");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_590_400_000), "2025-12-01T12:00:00Z");
    }
}

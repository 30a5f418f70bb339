import FlowEngine
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// The operator's status page (`GET /status`, `GET /status/installations/{id}`): server-rendered
/// HTML with inline CSS and an inline SVG chart. No script, nothing fetched from elsewhere, nothing
/// secret; every interpolated text is HTML-escaped.
enum StatusPage {
    /// Installations per page of the table.
    static let pageSize = 50

    /// The filters of the installations table.
    enum Filter: String, CaseIterable, Sendable {
        case all
        case attention
        case circuit
        case failing
        case noTrigger = "no-trigger"
        case uninstalled

        var label: String {
            switch self {
            case .all: return "All"
            case .attention: return "Needs attention"
            case .circuit: return "Circuit open"
            case .failing: return "Failing"
            case .noTrigger: return "No trigger registered"
            case .uninstalled: return "Uninstalled"
            }
        }

        func accepts(_ row: StatusReport.Row) -> Bool {
            switch self {
            case .all: return true
            case .attention: return row.attentionRank < 4
            case .circuit: return row.attentionRank == 0
            case .failing: return row.health.consecutiveFailures > 0 || row.attentionRank <= 2
            case .noTrigger: return row.record.status == .active && !row.record.triggerRegistered
            case .uninstalled: return row.record.status == .uninstalled
            }
        }
    }

    // MARK: Escaping and formatting

    /// `text` with `&`, `<`, `>`, `"` and `'` replaced by character references.
    static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for c in text.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default:
                if c.value < 0x20 && c != "\n" && c != "\t" { out += "\u{FFFD}" } else { out.unicodeScalars.append(c) }
            }
        }
        return out
    }

    static func time(seconds: Int64) -> String { RFC3339.string(unixSeconds: seconds) }
    static func time(ms: Int64) -> String { RFC3339.string(unixSeconds: ms / 1000) }

    /// `in 5 min`, `3 h ago`, …
    static func relative(_ seconds: Int64) -> String {
        let magnitude = abs(seconds)
        let text: String
        if magnitude < 60 {
            text = "\(magnitude) s"
        } else if magnitude < 3600 {
            text = "\(magnitude / 60) min"
        } else if magnitude < 172_800 {
            text = "\(magnitude / 3600) h"
        } else {
            text = "\(magnitude / 86400) d"
        }
        return seconds >= 0 ? "in " + text : text + " ago"
    }

    static func query(_ pairs: [(String, String)]) -> String {
        let allowed = CharacterSet.alphanumerics.union(CharacterSet(charactersIn: "-._~"))
        return pairs.filter { !$0.1.isEmpty }.map {
            $0.0 + "=" + ($0.1.addingPercentEncoding(withAllowedCharacters: allowed) ?? "")
        }.joined(separator: "&")
    }

    static func installationLink(_ id: InstallationID) -> String { "/status/installations/" + String(id.shortID) }

    // MARK: Responses

    /// An HTML answer that caches nothing and runs nothing.
    static func response(_ html: String, status: HTTPResponse.Status = .ok) -> Response {
        Response(
            status: status,
            headers: [
                .contentType: "text/html; charset=utf-8", .cacheControl: "no-store",
                .contentSecurityPolicy:
                    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                .xContentTypeOptions: "nosniff", .referrerPolicy: "no-referrer",
            ],
            body: .init(byteBuffer: ByteBuffer(string: html)))
    }

    // MARK: Layout

    static let css = """
        :root{color-scheme:light}
        *{box-sizing:border-box}
        body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#ffffff}
        header{background:#1b1f24;color:#ffffff;padding:.75rem 1rem;display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;align-items:baseline}
        header .brand{font-weight:700;font-size:1.1rem;color:#ffffff;text-decoration:none}
        header nav a{color:#ffffff;margin-right:1rem}
        main{padding:1rem;max-width:1400px;margin:0 auto}
        h1{font-size:1.5rem;margin:.25rem 0 1rem}
        h2{font-size:1.2rem;margin:1.5rem 0 .5rem}
        a{color:#0b57d0}
        .muted{color:#4d5561}
        .cards{display:flex;flex-wrap:wrap;gap:.75rem;padding:0;margin:0;list-style:none}
        .card{border:1px solid #c9ced6;border-radius:6px;padding:.6rem .8rem;min-width:10rem;flex:1 1 10rem;background:#ffffff;color:#1b1f24}
        .card dt{font-size:.8rem;color:#4d5561}
        .card dd{margin:0;font-size:1.4rem;font-weight:700}
        .card dd small{font-size:.8rem;font-weight:400;color:#4d5561}
        .table-wrap{overflow-x:auto;border:1px solid #c9ced6;border-radius:6px}
        table{border-collapse:collapse;width:100%;font-size:.9rem}
        th,td{padding:.4rem .6rem;text-align:left;border-bottom:1px solid #e3e6ea;white-space:nowrap}
        thead th{background:#eef0f3;color:#1b1f24;font-weight:600}
        td.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82rem}
        .badge{display:inline-block;padding:.05rem .45rem;border-radius:999px;font-size:.8rem;font-weight:600}
        .bad{background:#fde7e9;color:#8a1020}
        .warn{background:#fff4ce;color:#6b4a00}
        .good{background:#e6f4ea;color:#14532d}
        .quiet{background:#eef0f3;color:#3d4451}
        form.filters{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:end;margin:.5rem 0 1rem}
        form.filters label{display:flex;flex-direction:column;font-size:.85rem;color:#1b1f24}
        input,select,button{font:inherit;padding:.3rem .5rem;border:1px solid #6b7380;border-radius:4px;color:#1b1f24;background:#ffffff}
        button{background:#0b57d0;color:#ffffff;border-color:#0b57d0;cursor:pointer}
        .pager{display:flex;gap:1rem;align-items:center;margin:.75rem 0}
        .chart{max-width:760px}
        .chart svg{width:100%;height:auto;display:block}
        .legend{display:flex;flex-wrap:wrap;gap:.25rem 1rem;font-size:.85rem;padding:0;list-style:none}
        dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem}
        dl.facts dt{color:#4d5561}
        dl.facts dd{margin:0;overflow-wrap:anywhere}
        @media (max-width:600px){main{padding:.6rem}h1{font-size:1.25rem}dl.facts{grid-template-columns:1fr}}
        """

    static func document(title: String, body: String, current: String) -> String {
        """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>\(escape(title)) · token-gateway</title>
        <style>\(css)</style>
        </head>
        <body>
        <header>
        <a class="brand" href="/status">token-gateway status</a>
        <nav aria-label="Status pages"><a href="/status"\(current == "overview" ? " aria-current=\"page\"" : "")>Overview</a><a href="/status?state=attention">Needs attention</a></nav>
        </header>
        <main id="main">
        \(body)
        </main>
        </body>
        </html>
        """
    }

    static func badge(_ row: StatusReport.Row) -> String {
        let cls: String
        switch row.attentionRank {
        case 0, 1, 2: cls = "bad"
        case 3, 4: cls = "warn"
        case 5: cls = "good"
        default: cls = "quiet"
        }
        return "<span class=\"badge \(cls)\">\(escape(row.attentionReason))</span>"
    }

    static func outcomeBadge(_ outcome: String) -> String {
        "<span class=\"badge \(outcome == "success" ? "good" : "bad")\">\(escape(outcome))</span>"
    }

    // MARK: Chart

    /// An SVG scatter chart of round trips over the hour before `now`: time across, latency up;
    /// successes as circles, failures as crosses (shape and colour both tell them apart).
    static func chart(_ records: [RoundTripRecord], now: FlowTime, id: String) -> String {
        let width = 720.0
        let height = 240.0
        let left = 60.0
        let right = 12.0
        let top = 12.0
        let bottom = 36.0
        let start = now.unixMilliseconds - 3_600_000
        let inHour = records.filter { $0.startedAt >= start }
        let slowest = inHour.map(\.durationMs).max() ?? 0
        var scale: Int64 = 1000
        while scale < slowest { scale = scale < 10_000 ? scale * 2 : scale + 10_000 }
        let plotW = width - left - right
        let plotH = height - top - bottom
        func x(_ ms: Int64) -> Double { left + plotW * Double(max(0, ms - start)) / 3_600_000 }
        func y(_ ms: Int64) -> Double { top + plotH * (1 - Double(min(ms, scale)) / Double(scale)) }
        let counts = StatusReport.countByOutcome(inHour)
        let summary =
            inHour.isEmpty
            ? "No round trips in the last hour."
            : "\(inHour.count) round trips in the last hour: "
                + counts.map { "\($0.1) \($0.0)" }.joined(separator: ", ") + "; slowest \(slowest) ms."
        var svg = """
            <svg viewBox="0 0 \(Int(width)) \(Int(height))" role="img" aria-labelledby="\(id)-title \(id)-desc">
            <title id="\(id)-title">Round-trip latency and outcomes, last hour</title>
            <desc id="\(id)-desc">\(escape(summary))</desc>
            <rect x="\(left)" y="\(top)" width="\(plotW)" height="\(plotH)" fill="#ffffff" stroke="#6b7380"/>
            """
        for step in 0...4 {
            let value = scale * Int64(step) / 4
            let yy = y(value)
            svg += "<line x1=\"\(left)\" x2=\"\(width - right)\" y1=\"\(yy)\" y2=\"\(yy)\" stroke=\"#e3e6ea\"/>"
            svg +=
                "<text x=\"\(left - 6)\" y=\"\(yy + 4)\" text-anchor=\"end\" font-size=\"11\" fill=\"#1b1f24\">\(value) ms</text>"
        }
        for minutes in stride(from: 60, through: 0, by: -15) {
            let xx = x(now.unixMilliseconds - Int64(minutes) * 60_000)
            let label = minutes == 0 ? "now" : "−\(minutes) min"
            svg +=
                "<text x=\"\(xx)\" y=\"\(height - bottom + 16)\" text-anchor=\"middle\" font-size=\"11\" fill=\"#1b1f24\">\(label)</text>"
        }
        for r in inHour {
            let cx = x(r.startedAt)
            let cy = y(r.durationMs)
            if r.outcome == "success" {
                svg += "<circle cx=\"\(cx)\" cy=\"\(cy)\" r=\"4\" fill=\"#1a7f37\"/>"
            } else {
                svg +=
                    "<path d=\"M\(cx - 4) \(cy - 4)L\(cx + 4) \(cy + 4)M\(cx - 4) \(cy + 4)L\(cx + 4) \(cy - 4)\" stroke=\"#c62828\" stroke-width=\"2.5\"/>"
            }
        }
        svg += "</svg>"
        let legend =
            "<ul class=\"legend\"><li>● success (green circle)</li><li>✕ failed attempt outcome (red cross)</li><li class=\"muted\">\(escape(summary))</li></ul>"
        return "<figure class=\"chart\" style=\"margin:0\">\(svg)<figcaption>\(legend)</figcaption></figure>"
    }

    // MARK: Pages

    static func overview(_ report: StatusReport, filter: Filter, text: String, page: Int) -> String {
        let now = report.generatedAt
        var body = "<h1>Status</h1>"
        body +=
            "<p class=\"muted\">Generated \(escape(time(ms: now.unixMilliseconds))) by replica \(escape(report.replica)).</p>"

        body += Self.summarySection(report)
        body += Self.installationsSection(report, filter: filter, text: text, page: page)
        body += "<section aria-labelledby=\"chart-heading\"><h2 id=\"chart-heading\">Round trips, last hour</h2>"
        body += chart(report.roundTrips, now: now, id: "chart") + "</section>"

        body += Self.replicasSection(report)
        return document(title: "Status", body: body, current: "overview")
    }

    /// The overview's summary: cards and the round trips of the recent window by outcome.
    private static func summarySection(_ report: StatusReport) -> String {
        let recent = report.recentRoundTrips
        let minutes = StatusReport.recentWindow.milliseconds / 60_000
        var body = ""
        body +=
            "<section aria-labelledby=\"summary-heading\"><h2 id=\"summary-heading\">Summary</h2><dl class=\"cards\">"
        body +=
            "<div class=\"card\"><dt>Replicas seen</dt><dd id=\"summary-replicas\">\(report.replicas.count)</dd></div>"
        let redisText = report.redis.reachable ? (report.redis.role ?? "reachable") : "unreachable"
        body += "<div class=\"card\"><dt>Redis</dt><dd id=\"summary-redis\">\(escape(redisText))</dd></div>"
        body +=
            "<div class=\"card\"><dt>Round trips, last \(minutes) min</dt><dd id=\"summary-round-trips\">\(recent.count)</dd></div>"
        body +=
            "<div class=\"card\"><dt>Open circuits</dt><dd id=\"summary-open-circuits\">\(report.openCircuits.count)</dd></div>"
        body +=
            "<div class=\"card\"><dt>User exchanges, last minute</dt><dd><span id=\"summary-exchanges-used\">\(report.userExchangesUsed)</span> <small>of \(report.userExchangesLimit)</small></dd></div>"
        body +=
            "<div class=\"card\"><dt>Expiring, no trigger</dt><dd id=\"summary-expiring\">\(report.expiringWithoutTrigger.count)</dd></div>"
        body += "</dl>"

        body += "<h3>Round trips by outcome, last \(minutes) min</h3>"
        let counts = StatusReport.countByOutcome(recent)
        if counts.isEmpty {
            body += "<p class=\"muted\">None.</p>"
        } else {
            body += "<ul class=\"legend\" id=\"outcomes\">"
            for (outcome, count) in counts {
                body +=
                    "<li data-outcome=\"\(escape(outcome))\">\(outcomeBadge(outcome)) <span class=\"count\">\(count)</span></li>"
            }
            body += "</ul>"
        }
        body += "</section>"

        return body
    }

    /// The overview's installations: the filter form, one page of the table and the pager.
    private static func installationsSection(
        _ report: StatusReport, filter: Filter, text: String, page: Int
    ) -> String {
        let now = report.generatedAt
        var body = ""
        let needle = text.lowercased()
        let matching = report.rows.filter {
            filter.accepts($0) && (needle.isEmpty || $0.record.id.ari.lowercased().contains(needle))
        }
        let pages = max(1, (matching.count + pageSize - 1) / pageSize)
        let current = min(max(page, 1), pages)
        let shown = matching.dropFirst((current - 1) * pageSize).prefix(pageSize)
        body += "<section aria-labelledby=\"installations-heading\"><h2 id=\"installations-heading\">Installations</h2>"
        body +=
            "<form class=\"filters\" method=\"get\" action=\"/status\" role=\"search\" aria-label=\"Filter installations\">"
        body +=
            "<label for=\"filter-q\">Installation id contains<input id=\"filter-q\" name=\"q\" type=\"search\" value=\"\(escape(text))\"></label>"
        body += "<label for=\"filter-state\">Show<select id=\"filter-state\" name=\"state\">"
        for f in Filter.allCases {
            body += "<option value=\"\(f.rawValue)\"\(f == filter ? " selected" : "")>\(escape(f.label))</option>"
        }
        body += "</select></label><button type=\"submit\">Filter</button></form>"
        body +=
            "<p class=\"muted\" id=\"installations-count\">\(matching.count) of \(report.rows.count) installations, most urgent first\(report.truncated ? " (only the first \(StatusReport.maxInstallations) read)" : "").</p>"
        body +=
            "<div class=\"table-wrap\" role=\"region\" aria-labelledby=\"installations-heading\" tabindex=\"0\"><table id=\"installations\">"
        body += "<thead><tr>"
        for h in [
            "Installation", "Attention", "Status", "Trigger", "Token expires in", "Last token", "Last round trip",
            "Consecutive failures", "Circuit open until", "Key id",
        ] {
            body += "<th scope=\"col\">\(h)</th>"
        }
        body += "</tr></thead><tbody>"
        for row in shown {
            let r = row.record
            let h = row.health
            let expires = r.tokenExpiresAt.map { relative($0 - now.unixSeconds) } ?? "—"
            let lastToken = r.lastTokenAt.map { time(seconds: $0) + " (" + (r.lastTokenVia ?? "unknown") + ")" } ?? "—"
            let lastRound = h.lastRoundTrip.map { "\(outcomeBadge($0.outcome)) \($0.durationMs) ms" } ?? "—"
            let circuit = h.circuitOpenUntil > now.unixMilliseconds ? time(ms: h.circuitOpenUntil) : "—"
            body += "<tr data-installation=\"\(escape(r.id.ari))\">"
            body +=
                "<th scope=\"row\" class=\"id\"><a href=\"\(escape(installationLink(r.id)))\">\(escape(String(r.id.shortID)))</a></th>"
            body += "<td>\(badge(row))</td><td data-field=\"status\">\(escape(r.status.rawValue))</td>"
            body += "<td data-field=\"trigger\">\(r.triggerRegistered ? "registered" : "none")</td>"
            body +=
                "<td data-field=\"expires\">\(escape(expires))</td><td data-field=\"last-token\">\(escape(lastToken))</td>"
            body += "<td data-field=\"last-round-trip\">\(lastRound)</td>"
            body +=
                "<td data-field=\"failures\">\(h.consecutiveFailures)</td><td data-field=\"circuit\">\(escape(circuit))</td>"
            body += "<td data-field=\"key\" class=\"id\">\(escape(r.triggerKeyId ?? "—"))</td></tr>"
        }
        if shown.isEmpty { body += "<tr><td colspan=\"10\">No installation matches.</td></tr>" }
        body += "</tbody></table></div>"
        body += "<nav class=\"pager\" aria-label=\"Installation pages\">"
        let base: [(String, String)] = [("q", text), ("state", filter == .all ? "" : filter.rawValue)]
        if current > 1 {
            body +=
                "<a rel=\"prev\" href=\"/status?\(escape(query(base + [("page", String(current - 1))])))\">Previous page</a>"
        }
        body += "<span>Page \(current) of \(pages)</span>"
        if current < pages {
            body +=
                "<a rel=\"next\" href=\"/status?\(escape(query(base + [("page", String(current + 1))])))\">Next page</a>"
        }
        body += "</nav></section>"

        return body
    }

    /// The overview's replicas (live heartbeats) and the Redis facts.
    private static func replicasSection(_ report: StatusReport) -> String {
        var body = ""
        body += "<section aria-labelledby=\"replicas-heading\"><h2 id=\"replicas-heading\">Replicas and Redis</h2>"
        body +=
            "<div class=\"table-wrap\" role=\"region\" aria-labelledby=\"replicas-heading\" tabindex=\"0\"><table id=\"replicas\">"
        body +=
            "<caption class=\"muted\" style=\"text-align:left;padding:.4rem .6rem\">Replicas with a live heartbeat</caption>"
        body +=
            "<thead><tr><th scope=\"col\">Replica</th><th scope=\"col\">Version</th><th scope=\"col\">Started</th><th scope=\"col\">Last heartbeat</th></tr></thead><tbody>"
        for r in report.replicas {
            body +=
                "<tr><td class=\"id\">\(escape(r.replicaID))</td><td>\(escape(r.version))</td><td>\(escape(time(ms: r.startedAt)))</td><td>\(escape(time(ms: r.lastSeenAt)))</td></tr>"
        }
        body += "</tbody></table></div>"
        var redisFacts = "<dl class=\"facts\" id=\"redis\">"
        redisFacts += "<dt>Mode</dt><dd>\(escape(report.redis.mode))</dd>"
        if let address = report.redis.address { redisFacts += "<dt>Address</dt><dd>\(escape(address))</dd>" }
        if let master = report.redis.sentinelMaster {
            redisFacts += "<dt>Sentinel primary name</dt><dd>\(escape(master))</dd>"
            redisFacts += "<dt>Sentinels</dt><dd>\(escape(report.redis.sentinels.joined(separator: ", ")))</dd>"
        }
        redisFacts += "<dt>Reachable</dt><dd>\(report.redis.reachable ? "yes" : "no")</dd>"
        if let role = report.redis.role { redisFacts += "<dt>Role</dt><dd>\(escape(role))</dd>" }
        if let version = report.redis.version { redisFacts += "<dt>Version</dt><dd>\(escape(version))</dd>" }
        if let n = report.redis.connectedReplicas { redisFacts += "<dt>Connected Redis replicas</dt><dd>\(n)</dd>" }
        body += redisFacts + "</dl></section>"
        return body
    }

    static func installation(_ row: StatusReport.Row, history: [RoundTripRecord], now: FlowTime) -> String {
        let r = row.record
        let h = row.health
        var body = "<p><a href=\"/status\">← All installations</a></p>"
        body +=
            "<h1>Installation <span class=\"id\" style=\"overflow-wrap:anywhere\">\(escape(String(r.id.shortID)))</span></h1>"
        body +=
            "<section aria-labelledby=\"state-heading\"><h2 id=\"state-heading\">State</h2><dl class=\"facts\" id=\"facts\">"
        func fact(_ name: String, _ field: String, _ value: String) {
            body += "<dt>\(escape(name))</dt><dd data-field=\"\(field)\">\(escape(value))</dd>"
        }
        fact("Installation", "installation", r.id.ari)
        body += "<dt>Attention</dt><dd>\(badge(row))</dd>"
        fact("Status", "status", r.status.rawValue)
        fact("Trigger", "trigger", r.triggerRegistered ? "registered" : "none")
        fact(
            "Token expires", "expires",
            r.tokenExpiresAt.map { time(seconds: $0) + " (" + relative($0 - now.unixSeconds) + ")" } ?? "—")
        fact(
            "Last token", "last-token",
            r.lastTokenAt.map { time(seconds: $0) + " (" + (r.lastTokenVia ?? "unknown") + ")" } ?? "—")
        fact(
            "Last round trip", "last-round-trip",
            h.lastRoundTrip.map { "\($0.outcome), \($0.durationMs) ms, \(time(ms: $0.startedAt))" } ?? "—")
        fact("Consecutive failures", "failures", String(h.consecutiveFailures))
        fact(
            "Circuit open until", "circuit",
            h.circuitOpenUntil > now.unixMilliseconds ? time(ms: h.circuitOpenUntil) : "—")
        fact("Trigger key id", "key", r.triggerKeyId ?? "—")
        fact("App id", "app", r.appId ?? "—")
        fact("Cloud id", "cloud", r.cloudId ?? "—")
        body += "</dl></section>"
        body += "<section aria-labelledby=\"chart-heading\"><h2 id=\"chart-heading\">Round trips, last hour</h2>"
        body += chart(history, now: now, id: "chart") + "</section>"
        body += "<section aria-labelledby=\"history-heading\"><h2 id=\"history-heading\">Recent round trips</h2>"
        body +=
            "<p class=\"muted\">The latest \(GatewayStore.historyLength) round trips any replica led for this installation, newest first.</p>"
        body +=
            "<div class=\"table-wrap\" role=\"region\" aria-labelledby=\"history-heading\" tabindex=\"0\"><table id=\"round-trips\">"
        body +=
            "<thead><tr><th scope=\"col\">Started</th><th scope=\"col\">Outcome</th><th scope=\"col\">Duration</th><th scope=\"col\">Attempts</th><th scope=\"col\">Replica</th></tr></thead><tbody>"
        for e in history {
            body += "<tr><td data-field=\"started\">\(escape(time(ms: e.startedAt)))</td>"
            body += "<td data-field=\"outcome\">\(outcomeBadge(e.outcome))</td>"
            body += "<td data-field=\"duration\">\(e.durationMs) ms</td><td data-field=\"attempts\">\(e.attempts)</td>"
            body += "<td data-field=\"replica\" class=\"id\">\(escape(e.replica))</td></tr>"
        }
        if history.isEmpty { body += "<tr><td colspan=\"5\">No round trip recorded.</td></tr>" }
        body += "</tbody></table></div></section>"
        return document(title: "Installation " + String(r.id.shortID), body: body, current: "installation")
    }
}

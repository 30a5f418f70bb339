import Foundation

/// URL rules of the Connect routes.
enum ConnectURL {
    /// Whether `value` is an absolute http(s) URL with a host and no user info.
    static func isAbsoluteHTTP(_ value: String) -> Bool {
        guard let components = URLComponents(string: value), let scheme = components.scheme?.lowercased(),
            scheme == "http" || scheme == "https", let host = components.host, !host.isEmpty,
            components.user == nil, components.password == nil
        else { return false }
        return true
    }

    /// The path of a base URL without trailing `/` (`https://x.atlassian.net/wiki/` → `/wiki`);
    /// empty when it has none.
    static func basePath(of baseURL: String) -> String {
        SignedInstallVerifier.trimmingTrailingSlashes(URLComponents(string: baseURL)?.percentEncodedPath ?? "")
    }

    /// Whether `url` lies under `base`: same scheme, host (case-insensitive) and port (default
    /// ports filled in), and a path that is the base path or continues it after a `/`. A path
    /// with `.` or `..` segments (plain or percent-encoded) is never under anything.
    static func isURL(_ url: String, under base: String) -> Bool {
        guard self.isAbsoluteHTTP(url), self.isAbsoluteHTTP(base),
            let target = URLComponents(string: url), let root = URLComponents(string: base),
            target.scheme?.lowercased() == root.scheme?.lowercased(),
            target.host?.lowercased() == root.host?.lowercased(),
            self.effectivePort(target) == self.effectivePort(root)
        else { return false }
        let path = target.percentEncodedPath
        let segments = path.split(separator: "/", omittingEmptySubsequences: false)
        if segments.contains(where: { segment in
            let decoded = segment.lowercased().replacingOccurrences(of: "%2e", with: ".")
            return decoded == "." || decoded == ".."
        }) {
            return false
        }
        let basePath = self.basePath(of: base)
        if basePath.isEmpty { return true }
        return path == basePath || path.hasPrefix(basePath + "/")
    }

    private static func effectivePort(_ components: URLComponents) -> Int? {
        if let port = components.port { return port }
        switch components.scheme?.lowercased() {
        case "https": return 443
        case "http": return 80
        default: return nil
        }
    }
}

import Foundation

/// A named trigger's key: what `/forge/register` names it by (`"triggers": {"<key>": …}`), what
/// callers invoke (`POST …/invoke/{key}`) and what a caller's `invoke` list allows.
///
/// 1–64 characters of `a–z 0–9 _ -`, starting with a letter or digit (`^[a-z0-9][a-z0-9_-]{0,63}$`).
public enum NamedTriggerKey {
    /// Longest key.
    public static let maxLength = 64

    /// Whether `key` is a valid trigger key.
    public static func isValid(_ key: String) -> Bool {
        let bytes = key.utf8
        guard let first = bytes.first, bytes.count <= Self.maxLength, Self.isLeadByte(first) else { return false }
        return bytes.allSatisfy { Self.isLeadByte($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }
    }

    private static func isLeadByte(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }
}

/// The `triggers` member of a `/forge/register` body, validated: every key well formed, every URL
/// on the allow-list, at most ``maxCount`` entries.
///
/// `{"triggers": {"<key>": "https://…", "<other>": null}}` sets the first and removes the second.
/// The printed form shows the keys only: trigger URLs are credentials.
public struct NamedTriggerRegistration: Sendable, CustomStringConvertible {
    /// Most named triggers one installation may have (and most entries one registration may carry).
    public static let maxCount = 32
    /// Longest trigger URL accepted.
    public static let maxURLLength = 2048

    /// The changes in key order: a URL sets the trigger, nil removes it.
    public let changes: [(key: String, url: String?)]

    /// Why a `triggers` member was refused. The message never contains a URL.
    public struct Refusal: Error, Sendable, Hashable, CustomStringConvertible {
        /// `invalid_request` or `trigger_url_not_allowed`.
        public let code: String
        public let message: String
        public var description: String { "NamedTriggerRegistration.Refusal(\(self.code): \(self.message))" }
    }

    /// Reads `value` (the body's `triggers` member; nil or JSON null when absent).
    ///
    /// - Throws: ``Refusal`` with `invalid_request` for a value that is not an object, a bad key,
    ///   a value that is neither a string nor null, too many entries or a URL too long; with
    ///   `trigger_url_not_allowed` for a URL off the allow-list.
    public init(parsing value: Any?, allowList: TriggerHostAllowList) throws(Refusal) {
        guard let value, !(value is NSNull) else {
            self.changes = []
            return
        }
        guard let object = value as? [String: Any] else {
            throw Refusal(code: "invalid_request", message: "triggers must be an object of trigger key to URL or null")
        }
        guard object.count <= Self.maxCount else {
            throw Refusal(code: "invalid_request", message: "triggers has more than \(Self.maxCount) entries")
        }
        var changes: [(key: String, url: String?)] = []
        for key in object.keys.sorted() {
            guard NamedTriggerKey.isValid(key) else {
                throw Refusal(
                    code: "invalid_request",
                    message: "trigger keys are 1–64 characters of a–z 0–9 _ -, starting with a letter or digit")
            }
            let entry = object[key]
            if entry == nil || entry is NSNull {
                changes.append((key, nil))
                continue
            }
            guard let url = entry as? String, !url.isEmpty else {
                throw Refusal(code: "invalid_request", message: "triggers.\(key) must be a URL string or null")
            }
            guard url.utf8.count <= Self.maxURLLength else {
                throw Refusal(
                    code: "invalid_request", message: "triggers.\(key) is longer than \(Self.maxURLLength) bytes")
            }
            guard allowList.allows(url) else {
                throw Refusal(
                    code: "trigger_url_not_allowed",
                    message: "triggers.\(key) is not on the gateway's allow-list of trigger hosts")
            }
            changes.append((key, url))
        }
        self.changes = changes
    }

    /// True when the body carried no named trigger.
    public var isEmpty: Bool { self.changes.isEmpty }

    public var description: String {
        "NamedTriggerRegistration(\(self.changes.map { $0.url == nil ? "-" + $0.key : $0.key }.joined(separator: ", ")))"
    }
}

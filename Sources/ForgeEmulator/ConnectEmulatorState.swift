import Crypto
import Foundation
import _CryptoExtras

/// One emulated Atlassian Connect tenant: a product site with the Connect app installed.
///
/// It carries its shared secret because the emulator plays the product, which signs with it; the
/// printed form never shows the secret.
public struct EmulatedConnectTenant: Sendable, Hashable, CustomStringConvertible {
    /// The tenant's `clientKey` (the store key, `iss` of its JWTs).
    public let clientKey: String
    /// The app key (`key` of the install payload).
    public let appKey: String
    /// The product's base URL, with a context path for Confluence (`…/wiki`).
    public let baseUrl: String
    /// `jira` or `confluence`.
    public let productType: String
    /// The shared secret the tenant signs its JWTs with. Replaced by
    /// ``ForgeEmulator/rotateSharedSecret(of:)`` (sent on the next install).
    public internal(set) var sharedSecret: String
    /// The Forge installation this tenant's payload names (Connect on Forge), if any.
    public let installationId: String?
    /// The site's cloud id (the linked installation's). The install payload does not carry it.
    public let cloudId: String
    /// The account that makes the tenant's requests (`sub` of its JWTs).
    public let accountId: String
    /// `SEN-…`.
    public let serviceEntitlementNumber: String

    public var description: String { "EmulatedConnectTenant(clientKey: \(self.clientKey), baseUrl: \(self.baseUrl))" }

    /// The path of ``baseUrl`` (`/wiki`), or empty.
    public var contextPath: String { URLComponents(string: self.baseUrl)?.percentEncodedPath ?? "" }
}

/// Where a tenant stands from the emulator's point of view.
public enum EmulatedConnectTenantStatus: String, Sendable, Hashable, Codable {
    case created
    case installed
    case uninstalled
}

/// The Connect side's mutable state, kept in a `Mutex` in ``ForgeEmulator``. No I/O under the lock.
struct ConnectEmulatorState: Sendable {
    struct TenantRecord: Sendable {
        var tenant: EmulatedConnectTenant
        var status: EmulatedConnectTenantStatus
        let sequence: Int
    }

    /// The app key every tenant installs.
    var appKey = "com.example.token-gateway"
    /// The app's `baseUrl` (its descriptor's): the signed installs' `aud`; nil means the gateway URL.
    var appBaseURL: String?
    /// Signed-install private keys by `kid`; every one is published.
    var installKeys: [String: _RSA.Signing.PrivateKey] = [:]
    /// The `kid` new signed installs use.
    var currentKid: String?
    /// Key fetches served, by `kid` (unknown ones included).
    var keyFetches: [String: Int] = [:]
    var tenants: [String: TenantRecord] = [:]
    var nextSequence = 0

    mutating func remember(_ tenant: EmulatedConnectTenant) {
        self.tenants[tenant.clientKey] = TenantRecord(tenant: tenant, status: .created, sequence: self.nextSequence)
        self.nextSequence += 1
    }

    var orderedTenants: [TenantRecord] {
        self.tenants.values.sorted { $0.sequence < $1.sequence }
    }
}

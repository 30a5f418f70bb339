import AsyncHTTPClient
import FlowEngine
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import Tracing

/// Sends signed auth-trigger calls (contract §4) over HTTP.
///
/// Every call is signed with the installation's Ed25519 key (`X-Token-Gateway-Signature`); the
/// URL is checked against the allow-list again right before the call, redirects are never
/// followed, and each call ends within its timeout. The opened URL and key are kept per
/// installation and key id (``TriggerMaterialCache``); each attempt still reads which material is
/// in force (a round's first attempt in the same round trip as its lease, later ones on their
/// own), so a rotation or an uninstall is honoured at the next attempt.
public struct HTTPTriggerClient: TriggerSender {
    let store: GatewayStore
    let httpClient: HTTPClient
    let allowList: TriggerHostAllowList
    let logger: Logger
    let materials: TriggerMaterialCache

    public init(store: GatewayStore, httpClient: HTTPClient, allowList: TriggerHostAllowList, logger: Logger) {
        self.store = store
        self.httpClient = httpClient
        self.allowList = allowList
        self.logger = logger
        self.materials = TriggerMaterialCache()
    }

    /// Forgets the material held for an installation this replica saw uninstalled.
    func installationUninstalled(_ id: InstallationID) {
        self.materials.forget(id)
    }

    /// What the store reads with a round's lease for the round's first call: the material in
    /// force, and its sealed key unless the one held is still current.
    public func triggerMaterialQuery(for installation: InstallationID) -> TriggerMaterialQuery? {
        TriggerMaterialQuery(heldKeyID: self.materials.keyID(for: installation))
    }

    /// The trigger URL and signing key in force for `installation`, opened at most once per key id
    /// and stored URL; nil when no trigger is registered or the installation is not active.
    /// `leaseRead`: what the store read with the round's lease, used instead of a read of its own
    /// unless a next key is due (the read then promotes it).
    func material(
        for installation: InstallationID, leaseRead: TriggerMaterialRead? = nil,
        until deadline: ContinuousClock.Instant? = nil
    ) async throws
        -> TriggerMaterialCache.Entry?
    {
        // The store reads fit in the attempt's time left.
        func left() -> Duration? { deadline.map { $0 - ContinuousClock.now } }
        let now = FlowTime.now()
        let read: (version: GatewayStore.TriggerMaterialVersion, sealedKey: String?)?
        if let leaseRead, !GatewayStore.nextKeyIsDue(leaseRead, now: now),
            leaseRead.sealedKey != nil || leaseRead.keyID == self.materials.keyID(for: installation)
        {
            read = GatewayStore.materialInForce(leaseRead)
        } else {
            read = try await self.store.readTriggerMaterial(
                installation, now: now, cachedKeyID: self.materials.keyID(for: installation), timeout: left())
        }
        guard let read else {
            self.materials.forget(installation)
            return nil
        }
        let version = read.version
        if let entry = self.materials.entry(installation, version: version) { return entry }
        guard
            let opened = try await self.store.openTriggerMaterial(
                installation, version: version, sealedKey: read.sealedKey, timeout: left())
        else {
            self.materials.forget(installation)
            return nil
        }
        let key = try TriggerSigningKey(keyId: opened.keyID, rawPrivateKey: opened.rawPrivateKey)
        let entry = TriggerMaterialCache.Entry(version: version, url: opened.url, key: key)
        self.materials.store(installation, entry)
        return entry
    }

    /// The exact body bytes of a trigger call.
    public static func body(requestID: String, installation: InstallationID, issuedAt: Int64, expiresAt: Int64)
        -> [UInt8]
    {
        Array(
            JSONValue.object([
                ("requestId", .string(requestID)), ("installationId", .string(installation.ari)),
                ("issuedAt", .int(issuedAt)), ("expiresAt", .int(expiresAt)),
            ]).serialized().utf8)
    }

    public func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration
    ) async -> TriggerAttemptResult {
        await self.sendTrigger(
            installation: installation, requestID: requestID, attempt: attempt, issuedAt: issuedAt,
            expiresAt: expiresAt, timeout: timeout, material: nil)
    }

    public func sendTrigger(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration, material: TriggerMaterialRead?
    ) async -> TriggerAttemptResult {
        await withSpan("auth-trigger", ofKind: .client) { span in
            span.attributes["token_gateway.trigger.attempt"] = attempt
            let result = await self.send(
                installation: installation, requestID: requestID, attempt: attempt, issuedAt: issuedAt,
                expiresAt: expiresAt, timeout: timeout, leaseRead: material)
            if case .failed(let failure) = result {
                span.setStatus(SpanStatus(code: .error, message: failure.rawValue))
            }
            return result
        }
    }

    func send(
        installation: InstallationID, requestID: String, attempt: Int, issuedAt: FlowTime, expiresAt: FlowTime,
        timeout: Duration, leaseRead: TriggerMaterialRead? = nil
    ) async -> TriggerAttemptResult {
        // The attempt ends within its timeout, the store reads for its material included: the
        // round's lease is sized to it.
        let deadline = ContinuousClock.now + timeout
        var logger = self.logger
        logger[metadataKey: "installation.id"] = "\(installation)"
        logger[metadataKey: "request.id"] = "\(requestID)"
        logger[metadataKey: "trigger.attempt"] = "\(attempt)"
        let material: TriggerMaterialCache.Entry
        do {
            guard let m = try await self.material(for: installation, leaseRead: leaseRead, until: deadline) else {
                logger.warning("no trigger in force for installation (uninstalled, or none registered); not calling")
                return .notSent
            }
            material = m
        } catch let error as TriggerSigningError {
            logger.error("could not sign trigger call", metadata: ["error": "\(type(of: error))"])
            return .failed(.transportError)
        } catch let error as EncryptionError {
            // Counted in token_gateway_undecryptable_secrets_total (trigger_url / signing_key).
            logger.error(
                "trigger material does not open with the key ring (a key removed before keys rewrap finished?); not calling",
                metadata: ["error": "\(error)"])
            return .failed(.transportError)
        } catch {
            logger.warning("could not load trigger material", metadata: ["error": "\(error)"])
            return .failed(.transportError)
        }
        guard self.allowList.allows(material.url) else {
            logger.error("stored trigger URL is not on the allow-list; not calling it")
            return .failed(.transportError)
        }
        let body = Self.body(
            requestID: requestID, installation: installation, issuedAt: issuedAt.unixSeconds,
            expiresAt: (expiresAt.nanoseconds + 999_999_999) / 1_000_000_000)
        let signature: String
        do {
            signature = try material.key.signatureHeader(for: body)
        } catch {
            logger.error("could not sign trigger call", metadata: ["error": "\(type(of: error))"])
            return .failed(.transportError)
        }
        var request = HTTPClientRequest(url: material.url)
        request.method = .POST
        request.headers.add(name: "content-type", value: "application/json")
        request.headers.add(name: "x-token-gateway-signature", value: signature)
        request.headers.add(name: "user-agent", value: "token-gateway")
        request.body = .bytes(ByteBuffer(bytes: body))
        // Propagate the trace context (W3C, B3, … whichever instrument the operator bootstrapped).
        InstrumentationSystem.instrument.inject(
            ServiceContext.current ?? .topLevel, into: &request.headers, using: HTTPHeadersInjector())
        // The attempt ends within its timeout, body included (the client's own ends with the head):
        // the status decides, and a body still coming at the deadline is cut off.
        let left = deadline - ContinuousClock.now
        guard left > .zero else {
            logger.warning("trigger attempt's time went on reading its material; not calling")
            return .failed(.timeout)
        }
        do {
            let response = try await self.httpClient.execute(request, timeout: .nanoseconds(left.nanoseconds))
            _ = try? await response.body.collect(upTo: 64 * 1024, before: deadline)
            if (200..<300).contains(Int(response.status.code)) {
                logger.debug("trigger accepted", metadata: ["http.status": "\(response.status.code)"])
                return .accepted
            }
            logger.notice("trigger answered an error", metadata: ["http.status": "\(response.status.code)"])
            return .failed(.httpError)
        } catch let error as HTTPClientError
            where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout
        {
            return .failed(.timeout)
        } catch {
            if error is CancellationError { return .failed(.timeout) }
            logger.notice("trigger call failed", metadata: ["error": "\(type(of: error))"])
            return .failed(.transportError)
        }
    }
}

/// Writes trace-context headers into an outbound request.
struct HTTPHeadersInjector: Injector {
    func inject(_ value: String, forKey key: String, into carrier: inout HTTPHeaders) {
        carrier.replaceOrAdd(name: key, value: value)
    }
}

import Foundation
import Logging
import Metrics
import ServiceLifecycle

#if canImport(Glibc)
    import Glibc
#endif

/// Gives heap memory the process has freed back to the operating system now and then, and keeps
/// `token_gateway_resident_memory_bytes` up to date.
///
/// glibc's allocator keeps memory freed in the middle of its heaps (a burst of a thousand
/// connections leaves tens of MiB behind, measured in `Docs/performance.md`) and hands it back
/// only when asked (`malloc_trim`). Without that, a replica's resident memory after a burst stays
/// at the burst's high-water mark. Every ``interval`` the service asks, and counts what the
/// resident memory fell by in `token_gateway_memory_returned_bytes_total`. Where the C library has
/// no `malloc_trim` (musl, Darwin) it only updates the gauge.
public struct HeapTrimService: Service {
    /// Time between trims. Default 30 s.
    public var interval: Duration = .seconds(30)
    let returned: Counter
    let resident: Gauge
    let logger: Logger

    public init(factory: any MetricsFactory, logger: Logger) {
        self.returned = Counter(label: "token_gateway_memory_returned_bytes_total", factory: factory)
        self.resident = Gauge(label: "token_gateway_resident_memory_bytes", factory: factory)
        self.logger = logger
    }

    public func run() async {
        self.updateResident()
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do { try await Task.sleep(for: self.interval) } catch { break }
                self.trim()
            }
        }
    }

    /// Trims once: returns how many bytes the resident memory fell by (0 when it did not, or when
    /// there is nothing to trim with).
    @discardableResult
    func trim() -> Int {
        let before = HeapTrim.residentBytes()
        let after = HeapTrim.releaseFreeMemory() ? HeapTrim.residentBytes() : before
        if let after { self.resident.record(after) }
        guard let before, let after, before > after else { return 0 }
        self.returned.increment(by: before - after)
        self.logger.debug(
            "returned freed heap memory to the system",
            metadata: ["memory.returned_bytes": "\(before - after)", "memory.resident_bytes": "\(after)"])
        return before - after
    }

    private func updateResident() {
        if let bytes = HeapTrim.residentBytes() { self.resident.record(bytes) }
    }
}

/// The C library's side of ``HeapTrimService``.
enum HeapTrim {
    private typealias MallocTrim = @convention(c) (Int) -> Int32

    /// glibc's `malloc_trim`, looked up at run time: the C library module does not declare it, and
    /// other C libraries do not have it.
    private static let mallocTrim: MallocTrim? = {
        #if canImport(Glibc)
            guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return nil }
            return unsafeBitCast(symbol, to: MallocTrim.self)
        #else
            return nil
        #endif
    }()

    /// Asks the allocator to give every whole free page of its heaps back; false when it cannot.
    @discardableResult
    static func releaseFreeMemory() -> Bool {
        guard let mallocTrim = Self.mallocTrim else { return false }
        _ = mallocTrim(0)
        return true
    }

    /// The process's resident memory (`/proc/self/statm`), or nil where there is no such file.
    static func residentBytes() -> Int? {
        #if canImport(Glibc)
            // "size resident shared text lib data dt", in pages.
            guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return nil }
            let fields = statm.split(separator: " ")
            guard fields.count >= 2, let pages = Int(fields[1]) else { return nil }
            return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
        #else
            return nil
        #endif
    }
}

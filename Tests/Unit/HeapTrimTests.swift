import Logging
import Prometheus
import Testing

@testable import TokenGateway

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Heap trim: freed heap memory goes back to the system")
struct HeapTrimTests {
    #if canImport(Glibc)
        @Test("memory freed between blocks still in use is given back by a trim, and counted")
        func freedMemoryIsReturned() throws {
            // 64 MiB in 1 KiB blocks, each written to; then all but every 32nd block freed. The free
            // runs sit between blocks still in use, where free() alone keeps them resident.
            let count = 64 * 1024
            var blocks: [UnsafeMutableRawPointer] = []
            blocks.reserveCapacity(count)
            for _ in 0..<count {
                let block = try #require(malloc(1024))
                memset(block, 1, 1024)
                blocks.append(block)
            }
            for (index, block) in blocks.enumerated() where index % 32 != 0 { free(block) }
            defer { for (index, block) in blocks.enumerated() where index % 32 == 0 { free(block) } }

            let registry = PrometheusCollectorRegistry()
            let service = HeapTrimService(
                factory: PrometheusMetricsFactory(registry: registry), logger: Logger(label: "test"))
            let before = try #require(HeapTrim.residentBytes())
            let returned = service.trim()
            let after = try #require(HeapTrim.residentBytes())

            // About 54 MiB of whole free pages; other tests running beside this one allocate too.
            #expect(returned >= 16 * 1024 * 1024)
            #expect(after < before)
            let counted = AuditBufferTests.counterValue(registry, "token_gateway_memory_returned_bytes_total")
            #expect(counted == Double(returned))
            let gauge = AuditBufferTests.counterValue(registry, "token_gateway_resident_memory_bytes")
            #expect(gauge.map { $0 > 0 } == true)
        }
    #endif

    @Test("the resident memory is read from the system")
    func residentMemoryIsRead() throws {
        #if os(Linux)
            let bytes = try #require(HeapTrim.residentBytes())
            #expect(bytes > 1024 * 1024)
        #endif
    }
}

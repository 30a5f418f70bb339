// swift-tools-version:6.1
import PackageDescription

// The benchmark suite of token-gateway, a package of its own so the root package's build and
// test commands never build it (and never resolve ordo-one/benchmark).
//
//   swift package --package-path Benchmarks --scratch-path .build-bench benchmark
//
// (run from the repository root; `scripts/bench.sh` runs it together with the load benchmarks).
let package = Package(
    name: "token-gateway-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "token-gateway", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
    ],
    targets: [
        .executableTarget(
            name: "TokenGatewayBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "FlowEngine", package: "token-gateway"),
                .product(name: "TokenGateway", package: "token-gateway"),
                .product(name: "ForgeEmulator", package: "token-gateway"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "Benchmarks/TokenGatewayBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ]
)

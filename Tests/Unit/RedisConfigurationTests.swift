import Testing

@testable import RedisKit

@Suite struct RedisConfigurationTests {
    @Test func parsesADirectURL() throws {
        let configuration = try RedisConfiguration(url: "redis://127.0.0.1:6390/3")
        #expect(configuration.endpoint == .direct(host: "127.0.0.1", port: 6390))
        #expect(configuration.password == nil)
        #expect(configuration.database == 3)
    }

    @Test func appliesDocumentedDefaults() throws {
        let configuration = try RedisConfiguration(url: "redis://cache.internal")
        #expect(configuration.endpoint == .direct(host: "cache.internal", port: 6379))
        #expect(configuration.database == 0)
        #expect(configuration.poolSize == 4)
        #expect(configuration.connectTimeout == .seconds(1))
        #expect(configuration.commandTimeout == .seconds(2))
        #expect(configuration.reconnectBackoffBase == .milliseconds(50))
        #expect(configuration.reconnectBackoffCap == .seconds(2))
        #expect(try RedisConfiguration(url: "redis://h:1/").database == 0)
    }

    @Test func parsesAPasswordIncludingReservedCharacters() throws {
        let plain = try RedisConfiguration(url: "redis://:s3cret@localhost:6379/0")
        #expect(plain.password == "s3cret")
        #expect(plain.endpoint == .direct(host: "localhost", port: 6379))

        let tricky = try RedisConfiguration(url: "redis://:p@ss/w:rd%25%40@10.0.0.5:7000/2")
        #expect(tricky.password == "p@ss/w:rd%@")
        #expect(tricky.endpoint == .direct(host: "10.0.0.5", port: 7000))
        #expect(tricky.database == 2)

        #expect(try RedisConfiguration(url: "redis://:@h:1/0").password == nil)
    }

    @Test func parsesIPv6Hosts() throws {
        #expect(try RedisConfiguration(url: "redis://[::1]:6380/1").endpoint == .direct(host: "::1", port: 6380))
        #expect(try RedisConfiguration(url: "redis://[::1]").endpoint == .direct(host: "::1", port: 6379))
    }

    @Test func parsesASentinelURLWithSeveralHostsAndADatabase() throws {
        let configuration = try RedisConfiguration(
            url: "redis-sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380,sentinel-c/mymaster/5"
        )
        #expect(
            configuration.endpoint
                == .sentinel(
                    sentinels: [
                        RedisSentinelAddress(host: "10.0.0.1", port: 26379),
                        RedisSentinelAddress(host: "10.0.0.2", port: 26380),
                        RedisSentinelAddress(host: "sentinel-c", port: 26379),
                    ],
                    masterName: "mymaster"
                )
        )
        #expect(configuration.password == "pw")
        #expect(configuration.database == 5)

        let noDatabase = try RedisConfiguration(url: "redis-sentinel://127.0.0.1:26379/primary")
        #expect(noDatabase.database == 0)
        #expect(
            noDatabase.endpoint
                == .sentinel(sentinels: [RedisSentinelAddress(host: "127.0.0.1", port: 26379)], masterName: "primary")
        )
    }

    @Test(arguments: [
        ("http://:hunter2@h:1/0", "scheme"),
        ("hunter2", "expected redis://"),
        ("redis-cluster://:hunter2@h:1/3", "database 0"),
        ("rediss-cluster://:hunter2@h:1,h:/0", "port"),
        ("redis://:hunter2@:6379/0", "host is missing"),
        ("redis://:hunter2@h:port/0", "port"),
        ("redis://:hunter2@h:0/0", "port"),
        ("redis://:hunter2@h:70000/0", "port"),
        ("redis://:hunter2@h:1/db", "database"),
        ("redis://:hunter2@h:1/-1", "database"),
        ("redis://:hunter2@h:1/0/extra", "path"),
        ("redis://:hunter2@h:1/0?timeout=3", "query"),
        ("redis://:hunter2@h1:1,h2:2/0", "redis-sentinel"),
        ("redis://admin:@h:1/0", "needs a password"),
        ("redis://hunter2@h:1/0", "colon"),
        ("redis://:hunter2%zz@h:1/0", "percent-encoding"),
        ("redis://:hunter2@h st:1/0", "invalid characters"),
        ("redis://:hunter2@[::1:1/0", "bracket"),
        ("redis-sentinel://:hunter2@h:26379", "master name"),
        ("redis-sentinel://:hunter2@h:26379/", "master name"),
        ("redis-sentinel://:hunter2@h:26379,/m", "host is missing"),
        ("redis-sentinel://:hunter2@h:26379/m/x", "database"),
        ("redis-sentinel://:hunter2@h:26379/m/1/2", "path"),
    ])
    func rejectsMalformedURLsNamingTheProblemButNotThePassword(url: String, problem: String) {
        do {
            let configuration = try RedisConfiguration(url: url)
            Issue.record("parsed \(configuration.endpoint)")
        } catch let error as RedisConfigurationError {
            #expect(error.description.contains(problem), "\(error)")
            #expect(!error.description.contains("hunter2"), "\(error)")
        } catch {
            Issue.record("unexpected error type \(error)")
        }
    }

    @Test func parsesACLUsersTLSAndClusters() throws {
        let user = try RedisConfiguration(url: "redis://gateway:s%40cret@127.0.0.1:6380/2")
        #expect(user.username == "gateway")
        #expect(user.password == "s@cret")
        #expect(user.tls == nil)
        #expect(user.database == 2)
        #expect(user.description.hasPrefix("redis://gateway:***@127.0.0.1:6380/2"))
        #expect(!String(reflecting: user).contains("s@cret"))

        let tls = try RedisConfiguration(url: "rediss://:pw@cache.example.com:6380/0")
        #expect(tls.tls != nil)
        #expect(tls.username == nil)
        #expect(tls.description.hasPrefix("rediss://:***@cache.example.com:6380/0"))

        let sentinel = try RedisConfiguration(url: "rediss-sentinel://u:pw@s1:26380,s2/main/1")
        #expect(sentinel.tls != nil)
        #expect(sentinel.username == "u")
        #expect(
            sentinel.endpoint
                == .sentinel(
                    sentinels: [RedisNodeAddress(host: "s1", port: 26380), RedisNodeAddress(host: "s2", port: 26379)],
                    masterName: "main"))

        let cluster = try RedisConfiguration(url: "redis-cluster://127.0.0.1:7000,[::1]:7001,node3")
        #expect(
            cluster.endpoint
                == .cluster(seeds: [
                    RedisNodeAddress(host: "127.0.0.1", port: 7000), RedisNodeAddress(host: "::1", port: 7001),
                    RedisNodeAddress(host: "node3", port: 6379),
                ]))
        #expect(cluster.database == 0)
        #expect(try RedisConfiguration(url: "rediss-cluster://u:pw@h:7000/0").tls != nil)
        #expect(cluster.description.hasPrefix("redis-cluster://127.0.0.1:7000,[::1]:7001,node3:6379"))
    }

    @Test func printedFormsRedactThePassword() throws {
        let configuration = try RedisConfiguration(url: "redis://:hunter2@127.0.0.1:6379/1")
        #expect(configuration.description.hasPrefix("redis://:***@127.0.0.1:6379/1"))
        #expect(!"\(configuration)".contains("hunter2"))
        #expect(!String(reflecting: configuration).contains("hunter2"))
        var dumped = ""
        dump(configuration, to: &dumped)
        #expect(!dumped.contains("hunter2"))
        #expect(dumped.contains("***"))

        let sentinel = try RedisConfiguration(url: "redis-sentinel://:hunter2@a:1,b:2/m/3")
        #expect(sentinel.description.hasPrefix("redis-sentinel://:***@a:1,b:2/m/3"))
        #expect(!"\(sentinel.endpoint)".contains("hunter2"))
    }
}

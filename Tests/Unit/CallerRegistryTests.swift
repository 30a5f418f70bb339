import Crypto
import Testing

@testable import TokenGateway

@Suite struct CallerRegistryTests {
    static let uuidA = "1b7c3c5e-6a3b-4d4f-9e57-2f4d8c1a0b11"
    static let uuidB = "9f0e8d7c-6b5a-4321-8fed-cba987654321"
    static let ariA = "ari:cloud:ecosystem::installation/\(uuidA)"
    static let ariB = "ari:cloud:ecosystem::installation/\(uuidB)"

    static func sha256Hex(_ text: String) -> String {
        SHA256.hash(data: Array(text.utf8)).map { byte in
            let digits = Array("0123456789abcdef")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
        }.joined()
    }

    static let registryJSON = """
        [
          {"name": "billing", "secret": "billing-secret-1", "installations": ["*"], "clientKeys": ["*"]},
          {"name": "reports", "secretSha256": "\(sha256Hex("reports-secret-2").uppercased())",
           "installations": ["\(uuidA)"]},
          {"name": "search", "secret": "search-secret-3-0123", "installations": ["\(ariB)"], "clientKeys": ["ck-1", "ck-2"]}
        ]
        """

    @Test func authenticatesBearerSecretsInBothForms() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        #expect(registry.callers.map(\.name) == ["billing", "reports", "search"])
        #expect(registry.authenticate(authorization: "Bearer billing-secret-1")?.name == "billing")
        #expect(registry.authenticate(authorization: "Bearer reports-secret-2")?.name == "reports")
        #expect(registry.authenticate(authorization: "bearer search-secret-3-0123")?.name == "search")
        #expect(registry.authenticate(authorization: "BEARER search-secret-3-0123")?.name == "search")
    }

    @Test func refusesWrongOrMissingCredentials() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        for header in [
            nil, "", "Bearer", "Bearer ", "Bearer wrong", "Bearer billing-secret-", "Bearer billing-secret-1x",
            "Basic billing-secret-1", "billing-secret-1", "Bearerbilling-secret-1",
            // The digest itself is not a credential.
            "Bearer \(Self.sha256Hex("reports-secret-2"))",
        ] as [String?] {
            #expect(registry.authenticate(authorization: header) == nil, "\(String(describing: header))")
        }
    }

    @Test func authenticatesByNameAndSecret() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        #expect(registry.authenticate(name: "billing", secret: "billing-secret-1")?.name == "billing")
        #expect(registry.authenticate(name: "reports", secret: "reports-secret-2")?.name == "reports")
        #expect(registry.authenticate(name: "billing", secret: "search-secret-3-0123") == nil)
        #expect(registry.authenticate(name: "nobody", secret: "billing-secret-1") == nil)
        #expect(registry.authenticate(name: "billing", secret: "") == nil)
    }

    @Test func installationScopesAcceptARIAndBareIdForms() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        let billing = try #require(registry.callers.first { $0.name == "billing" })
        let reports = try #require(registry.callers.first { $0.name == "reports" })
        let search = try #require(registry.callers.first { $0.name == "search" })

        #expect(billing.installations.contains(Self.ariA) && billing.installations.contains(Self.ariB))
        #expect(billing.installations.isAll)

        // Configured as a bare UUID: matches the ARI and the bare id.
        #expect(reports.installations.contains(Self.ariA))
        #expect(reports.installations.contains(Self.uuidA))
        #expect(!reports.installations.contains(Self.ariB))
        #expect(!reports.installations.contains(Self.uuidB))
        #expect(reports.installations.values == [Self.ariA])

        // Configured as an ARI: matches both forms too.
        #expect(search.installations.contains(Self.ariB))
        #expect(search.installations.contains(Self.uuidB))
        #expect(!search.installations.contains(Self.ariA))
        #expect(!search.installations.contains("ari:cloud:ecosystem::installation/"))
        #expect(!search.installations.contains(""))
    }

    @Test func clientKeyScopesMatchExactlyAndDefaultToNone() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        let billing = try #require(registry.callers.first { $0.name == "billing" })
        let reports = try #require(registry.callers.first { $0.name == "reports" })
        let search = try #require(registry.callers.first { $0.name == "search" })
        #expect(billing.clientKeys.contains("anything"))
        #expect(reports.clientKeys == .none)
        #expect(!reports.clientKeys.contains("ck-1"))
        #expect(search.clientKeys.contains("ck-1") && search.clientKeys.contains("ck-2"))
        #expect(!search.clientKeys.contains("CK-1") && !search.clientKeys.contains("ck-3"))
    }

    @Test func scopeValues() {
        #expect(CallerScope.all.contains("x"))
        #expect(!CallerScope.none.contains("x"))
        #expect(CallerScope(["a", "*"]) == .all)
        #expect(CallerScope(["a"]).contains("a") && !CallerScope(["a"]).contains("b"))
    }

    @Test func malformedSettingsAreRefusedWithoutNamingSecrets() {
        let secret = "top-secret-value-123"
        let cases: [(json: String, mentions: [String])] = [
            ("", ["not valid JSON"]),
            ("{\"name\": \"a\"}", ["array"]),
            ("[]", ["no caller"]),
            ("[42]", ["[0]", "object"]),
            ("[{\"secret\": \"\(secret)\"}]", ["[0]", "\"name\""]),
            ("[{\"name\": \"\", \"secret\": \"\(secret)\"}]", ["[0]", "\"name\""]),
            ("[{\"name\": \"a\"}]", ["[0]", "\"a\"", "exactly one of"]),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\", \"secretSha256\": \"\(Self.sha256Hex(secret))\"}]",
                ["\"a\"", "exactly one of"]
            ),
            ("[{\"name\": \"a\", \"secret\": \"\"}]", ["\"a\"", "\"secret\""]),
            ("[{\"name\": \"a\", \"secret\": \"fifteen-chars-x\"}]", ["\"a\"", "at least 16 characters"]),
            ("[{\"name\": \"a\", \"secret\": 12}]", ["\"a\"", "\"secret\""]),
            ("[{\"name\": \"a\", \"secretSha256\": \"abc\"}]", ["\"a\"", "secretSha256"]),
            ("[{\"name\": \"a\", \"secretSha256\": \"\(String(repeating: "g", count: 64))\"}]", ["secretSha256"]),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\"}, {\"name\": \"a\", \"secret\": \"other-secret-0123456789\"}]",
                ["[1]", "\"a\"", "another caller"]
            ),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\", \"installations\": \"*\"}]",
                ["\"installations\"", "array"]
            ),
            ("[{\"name\": \"a\", \"secret\": \"\(secret)\", \"installations\": [1]}]", ["\"installations\""]),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\", \"installations\": [\"not a/valid id\"]}]",
                ["\"installations\"[0]"]
            ),
            ("[{\"name\": \"a\", \"secret\": \"\(secret)\", \"clientKeys\": [\"\"]}]", ["\"clientKeys\""]),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\", \"installation\": [\"*\"]}]",
                ["unknown field", "\"installation\""]
            ),
            // One secret for two callers, in either form: Bearer would always find the first.
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\"}, {\"name\": \"b\", \"secret\": \"\(secret)\"}]",
                ["[1]", "\"b\"", "[0]", "\"a\"", "its own"]
            ),
            (
                "[{\"name\": \"a\", \"secret\": \"\(secret)\"}, {\"name\": \"b\", \"secretSha256\": \"\(Self.sha256Hex(secret))\"}]",
                ["[1]", "\"b\"", "its own"]
            ),
            ("[{\"name\": \"a:b\", \"secret\": \"\(secret)\"}]", ["[0]", "\":\""]),
        ]
        for (json, mentions) in cases {
            do {
                _ = try CallerRegistry(json: json)
                Issue.record("accepted \(json.count)-character setting")
            } catch let error as ConfigurationValueError {
                #expect(error.message.contains("TOKEN_GATEWAY_CALLERS"), "\(error.message)")
                for word in mentions { #expect(error.message.contains(word), "\(error.message) lacks \(word)") }
                #expect(!error.message.contains(secret), "\(error.message)")
                #expect(!error.message.contains(Self.sha256Hex(secret)), "\(error.message)")
            } catch {
                Issue.record("unexpected error \(error)")
            }
        }
    }

    @Test func printedFormsShowNoSecret() throws {
        let registry = try CallerRegistry(json: Self.registryJSON)
        var dumped = ""
        dump(registry.callers, to: &dumped)
        for text in ["\(registry)", "\(registry.callers)", dumped] {
            #expect(!text.contains("billing-secret-1"))
            #expect(!text.contains(Self.sha256Hex("reports-secret-2")))
            #expect(!text.contains(Self.sha256Hex("reports-secret-2").uppercased()))
        }
        #expect(registry.callers[0].description == "Caller(billing)")
    }

    @Test func limitsDefaultAndParse() throws {
        let registry = try CallerRegistry(
            json: """
                [{"name": "a", "secret": "a-secret-0123456789", "installations": ["*"]},
                 {"name": "b", "secret": "b-secret-0123456789", "limits": {"refreshesPerMinute": 5, "userExchangesPerMinute": 0}},
                 {"name": "c", "secret": "c-secret-0123456789", "limits": {"refreshesPerMinute": 7}}]
                """)
        #expect(registry.callers[0].limits == CallerLimits(refreshesPerMinute: 60, userExchangesPerMinute: 300))
        #expect(registry.callers[1].limits == CallerLimits(refreshesPerMinute: 5, userExchangesPerMinute: 0))
        #expect(registry.callers[2].limits == CallerLimits(refreshesPerMinute: 7, userExchangesPerMinute: 300))
        #expect(registry.callers[0].storeTag.count == 24)
        #expect(registry.callers[0].storeTag != registry.callers[1].storeTag)
        // An optional field given as null is left out: its default.
        let nulls = try CallerRegistry(
            json: """
                [{"name": "n", "secret": "n-secret-0123456789", "secretSha256": null, "installations": null,
                  "clientKeys": null, "invoke": null, "operator": null, "limits": null},
                 {"name": "m", "secret": "m-secret-0123456789", "limits": {"refreshesPerMinute": null, "userExchangesPerMinute": 4}}]
                """)
        #expect(nulls.callers[0].limits == CallerLimits(refreshesPerMinute: 60, userExchangesPerMinute: 300))
        #expect(nulls.callers[0].clientKeys == CallerScope([]))
        #expect(!nulls.callers[0].isOperator)
        #expect(nulls.callers[1].limits == CallerLimits(refreshesPerMinute: 60, userExchangesPerMinute: 4))
        // A required one given as null is missing.
        for missing in [#"{"name": null, "secret": "n-secret-0123456789"}"#, #"{"name": "n", "secret": null}"#] {
            #expect(throws: ConfigurationValueError.self, "\(missing)") {
                try CallerRegistry(json: "[" + missing + "]")
            }
        }
        for bad in [
            #"{"refreshesPerMinute": -1}"#, #"{"refreshesPerMinute": 1.5}"#, #"{"refreshesPerMinute": "5"}"#,
            #"{"refreshesPerMinute": 2000000}"#, #"{"other": 1}"#, #"[1]"#,
            // JSON booleans, which Foundation reads as the numbers 1 and 0, are no integers.
            #"{"refreshesPerMinute": true}"#, #"{"userExchangesPerMinute": false}"#,
        ] {
            #expect(throws: ConfigurationValueError.self, "\(bad)") {
                try CallerRegistry(json: #"[{"name": "a", "secret": "a-secret-0123456789", "limits": "# + bad + "}]")
            }
        }
        // A misspelt field is named as unknown, whatever its value.
        let misspelt = #"[{"name": "a", "secret": "a-secret-0123456789", "limits": {"refreshPerMinute": "30"}}]"#
        #expect(throws: ConfigurationValueError.self) { try CallerRegistry(json: misspelt) }
        do {
            _ = try CallerRegistry(json: misspelt)
        } catch let error as ConfigurationValueError {
            #expect("\(error)".contains("unknown field in \"limits\""), "\(error)")
        }
    }
}

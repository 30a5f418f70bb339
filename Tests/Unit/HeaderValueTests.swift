import Foundation
import Testing

@testable import TokenGateway

/// `HeaderValue.trimmed` is Foundation's `trimmingCharacters(in: .whitespaces)`, with a shortcut
/// for values that start and end with a visible ASCII byte.
@Suite struct HeaderValueTests {
    static let values = [
        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", " token", "token ", "\ttoken\t", "  to ken  ", "\u{00A0}token",
        "token\u{2003}", "é-token-é", "", " ", "\t", "a",
    ]

    @Test(arguments: Self.values)
    func trimsAsFoundationDoes(value: String) {
        #expect(HeaderValue.trimmed(value) == value.trimmingCharacters(in: .whitespaces))
        let header = "Bearer " + value
        #expect(HeaderValue.trimmed(header.dropFirst(7)) == value.trimmingCharacters(in: .whitespaces))
    }
}

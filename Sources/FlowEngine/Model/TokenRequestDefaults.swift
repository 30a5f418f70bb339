/// The defaults of a token request (contract §2): what a caller gets when it names no `minValidity`
/// or `timeout`, and what the OAuth endpoint and user-token exchanges use; and the values a caller
/// may name. Defined here only.
public enum TokenRequestDefaults {
    /// Seconds a handed-out token must still be valid for: 300 (5 minutes).
    public static let minValidity: Int64 = 300
    /// How long a request may wait for a round trip to Forge: 10 seconds.
    public static let timeout: Duration = .seconds(10)
    /// The `minValidity` values a caller may ask for, in seconds.
    public static let minValidityRange: ClosedRange<Int64> = 0...7200
    /// The `timeout` values a caller may ask for, in milliseconds.
    public static let timeoutMillisecondsRange: ClosedRange<Int64> = 100...30000
}

extension GatewayStore {
    /// The records of the first `limit` of `ids` (in order), and the cursor of the next page when
    /// `ids` holds more than `limit` (the last id of this page).
    public func loadPage(_ ids: [InstallationID], limit: Int) async throws -> ([InstallationRecord], String?) {
        let more = ids.count > limit
        let taken = Array(ids.prefix(limit))
        if taken.isEmpty { return ([], nil) }
        let hashes = try await self.redis.pipeline(taken.map { ["HGETALL", self.installationKey($0)] })
        var records: [InstallationRecord] = []
        for (id, reply) in zip(taken, hashes) {
            let fields = reply.fieldDictionary
            if !fields.isEmpty {
                var record = InstallationRecord(id: id, fields: fields)
                record.apiBaseUrl = self.openAPIBaseURL(fields["apiBaseUrl"], id)
                records.append(record)
            }
        }
        return (records, more ? taken.last?.ari : nil)
    }
}

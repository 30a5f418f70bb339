import FlowEngine

extension GatewayStore {
    /// One page of the installations among `ids`, ordered by id, starting after `cursor` (an
    /// installation ARI): the listing of a caller with a narrow scope. It costs in proportion to
    /// `ids` (membership in the index is checked per id, in pipelined batches), never to the whole
    /// index. Returns the records and the id to continue after when more remain.
    public func listInstallations(among ids: [InstallationID], after cursor: String?, limit: Int) async throws
        -> (records: [InstallationRecord], next: String?)
    {
        let candidates = Array(Set(ids)).filter { cursor == nil || $0.ari > cursor! }.sorted()
        var found: [InstallationID] = []
        var index = 0
        while found.count <= limit, index < candidates.count {
            let batch = Array(candidates[index..<min(index + max(limit + 1, 64), candidates.count)])
            index += batch.count
            let scores = try await self.redis.pipeline(batch.map { ["ZSCORE", self.installationsIndexKey, $0.ari] })
            for (id, score) in zip(batch, scores) where score.string != nil {
                found.append(id)
                if found.count > limit { break }
            }
        }
        return try await self.loadPage(found, limit: limit)
    }
}

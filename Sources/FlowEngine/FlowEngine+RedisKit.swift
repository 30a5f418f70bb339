// The store's API is written in RedisKit's types (`RedisClient`, `RedisError`, `RedisConfiguration`); users of
// the engine get them with `import FlowEngine`.
@_exported import RedisKit

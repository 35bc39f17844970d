import Dispatch
import Synchronization

/// Shares fdatasyncs between concurrent appenders: every request made while a sync runs is served by the next
/// one, so N concurrent publishes cost one fdatasync per partition instead of N.
///
/// Syncs run on one dedicated dispatch queue (never on Swift's cooperative pool, which a blocking fdatasync would
/// starve on a small machine).
public final class GroupCommit: Sendable {
    struct Request {
        let log: PartitionLog
        let offset: Int64
        let completion: @Sendable ((any Error)?) -> Void
    }

    struct Pending {
        var requests: [Request] = []
        var scheduled = false
    }

    private let queue = DispatchQueue(label: "herald.group-commit", qos: .userInitiated)
    private let pending = Mutex(Pending())

    public init() {}

    /// Calls `completion` (on the sync queue) once every record of `log` below `offset` is durable, or with the
    /// error that stopped the log.
    public func whenDurable(
        _ log: PartitionLog, through offset: Int64, _ completion: @escaping @Sendable ((any Error)?) -> Void
    ) {
        if log.durableOffset >= offset {
            completion(nil)
            return
        }
        let schedule = pending.withLock { pending -> Bool in
            pending.requests.append(Request(log: log, offset: offset, completion: completion))
            if pending.scheduled { return false }
            pending.scheduled = true
            return true
        }
        if schedule { queue.async { self.drain() } }
    }

    /// Waits until every record of `log` below `offset` is durable.
    public func waitDurable(_ log: PartitionLog, through offset: Int64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            whenDurable(log, through: offset) { error in
                if let error { continuation.resume(throwing: error) } else { continuation.resume() }
            }
        }
    }

    private func drain() {
        while true {
            let batch = pending.withLock { pending -> [Request]? in
                if pending.requests.isEmpty {
                    pending.scheduled = false
                    return nil
                }
                defer { pending.requests = [] }
                return pending.requests
            }
            guard let batch else { return }
            var failures: [ObjectIdentifier: any Error] = [:]
            var synced: Set<ObjectIdentifier> = []
            for request in batch {
                let id = ObjectIdentifier(request.log)
                guard synced.insert(id).inserted else { continue }
                do { try request.log.sync() } catch { failures[id] = error }
            }
            for request in batch { request.completion(failures[ObjectIdentifier(request.log)]) }
        }
    }
}

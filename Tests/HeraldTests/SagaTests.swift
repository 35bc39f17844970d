import Herald
import Synchronization
import Testing

/// A two-step saga: Ping starts it, Pong finishes it; no Pong in time → it publishes a compensating event.
struct PingPongSaga: Saga {
    static let name = "pingpong"
    static let events: [any Event.Type] = [Ping.self, Pong.self]

    struct State: Codable, Sendable, Hashable {
        var pings: Int
        var done: Bool
    }

    func handle(_ event: DecodedEvent, state: State?, context: SagaContext) async throws -> SagaTransition<State> {
        guard case .known(let value, _) = event else { return .ignore }
        switch value {
        case is Ping:
            return .continue(State(pings: (state?.pings ?? 0) + 1, done: false), timeout: .milliseconds(30))
        case is Pong:
            return .finish(State(pings: state?.pings ?? 0, done: true))
        default:
            return .ignore
        }
    }

    func timedOut(state: State, context: SagaContext) async throws -> SagaTransition<State> {
        try await context.publish(Pong(number: -1))
        return .continue(state, timeout: nil)
    }
}

@Suite("Sagas")
struct SagaTests {
    @Test func stateIsKeptPerCorrelationID() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let store = InMemorySagaStore()
        let manager = SagaManager(PingPongSaga(), store: store, bus: bus)
        manager.start()
        try await bus.publish(Ping(number: 1), EventAttributes(correlationID: "a"))
        try await bus.publish(Ping(number: 2), EventAttributes(correlationID: "a"))
        try await bus.publish(Ping(number: 3), EventAttributes(correlationID: "b"))
        try await bus.publish(Pong(number: 4), EventAttributes(correlationID: "a"))
        let a = try #require(try await store.load(saga: "pingpong", id: "a"))
        let b = try #require(try await store.load(saga: "pingpong", id: "b"))
        #expect(a.finished && a.version == 3)
        #expect(!b.finished && b.version == 1)
        // A finished saga ignores further events.
        try await bus.publish(Ping(number: 5), EventAttributes(correlationID: "a"))
        #expect(try await store.load(saga: "pingpong", id: "a")?.version == 3)
    }

    @Test func timeoutsFireCompensationWithTheCorrelation() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let store = InMemorySagaStore()
        let manager = SagaManager(PingPongSaga(), store: store, bus: bus)
        manager.start()
        let compensations = Recorder<CloudEvent>()
        bus.subscribe(.type(Pong.eventType), name: "observer") { event, _ in compensations.append(event) }
        try await bus.publish(Ping(number: 1), EventAttributes(correlationID: "late"))
        #expect(try await manager.fireTimeouts() == 0)
        try await Task.sleep(for: .milliseconds(40))
        #expect(try await manager.fireTimeouts() == 1)
        #expect(compensations.all.map(\.correlationid) == ["late"])
        // The timeout is cleared: it does not fire again.
        #expect(try await manager.fireTimeouts(at: Timestamp.now().advanced(by: .seconds(60))) == 0)
    }

    @Test func concurrentEventsForOneSagaAreAllApplied() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 4))
        let store = InMemorySagaStore()
        let manager = SagaManager(PingPongSaga(), store: store, bus: bus)
        manager.start()
        for number in 0..<50 { try await bus.post(Ping(number: number), EventAttributes(correlationID: "busy")) }
        await bus.drain()
        let record = try #require(try await store.load(saga: "pingpong", id: "busy"))
        #expect(record.version == 50, "every event applied once despite conflicting saves")
    }

    @Test func storeRejectsAStaleVersion() async throws {
        let store = InMemorySagaStore()
        let record = SagaRecord(saga: "s", id: "1", state: [], version: 1, deadline: nil, finished: false)
        try await store.save(record)
        await #expect(throws: SagaStoreError.self) { try await store.save(record) }
        var next = record
        next.version = 2
        try await store.save(next)
    }
}

/// A saga store whose next save fails (a database hiccup after the transition published).
final class FailingOnceSagaStore: SagaStore {
    let inner = InMemorySagaStore()
    private let failNext = Mutex(false)
    struct Hiccup: Error {}

    func failNextSave() { failNext.withLock { $0 = true } }
    func load(saga: String, id: String) async throws -> SagaRecord? { try await inner.load(saga: saga, id: id) }
    func save(_ record: SagaRecord) async throws {
        if failNext.withLock({ value in
            defer { value = false }; return value
        }) {
            throw Hiccup()
        }
        try await inner.save(record)
    }
    func expired(saga: String, at time: Timestamp, limit: Int) async throws -> [SagaRecord] {
        try await inner.expired(saga: saga, at: time, limit: limit)
    }
}

/// Ping starts it; no answer in time → it publishes Pong (which it does not handle itself).
struct TimeoutSaga: Saga {
    static let name = "timeout"
    static let events: [any Event.Type] = [Ping.self]

    func handle(_ event: DecodedEvent, state: Int?, context: SagaContext) async throws -> SagaTransition<Int> {
        .continue((state ?? 0) + 1, timeout: .milliseconds(10))
    }

    func timedOut(state: Int, context: SagaContext) async throws -> SagaTransition<Int> {
        try await context.publish(Pong(number: -1))
        return .continue(state, timeout: nil)
    }
}

@Suite("Sagas: publishes of a repeated transition")
struct SagaRepeatTests {
    /// A transition whose save failed runs again and publishes the same event ids, so transports and consumers that
    /// deduplicate by (source, id) see a repeat rather than a second compensation; other transitions get other ids.
    @Test func aTransitionRunAgainAfterAFailedSavePublishesTheSameIDs() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let store = FailingOnceSagaStore()
        let manager = SagaManager(TimeoutSaga(), store: store, bus: bus)
        manager.start()
        let compensations = Recorder<CloudEvent>()
        bus.subscribe(.type(Pong.eventType), name: "observer") { event, _ in compensations.append(event) }
        try await bus.publish(Ping(number: 1), EventAttributes(correlationID: "a"))
        try await bus.publish(Ping(number: 2), EventAttributes(correlationID: "b"))
        try await Task.sleep(for: .milliseconds(40))
        store.failNextSave()
        await #expect(throws: FailingOnceSagaStore.Hiccup.self) { try await manager.fireTimeouts() }
        try await manager.fireTimeouts()
        let ids = compensations.all.map { "\($0.correlationid ?? "")/\($0.id)" }
        // "a" published twice (the failed transition and its rerun) with one id; "b" once, with another.
        let byInstance = Dictionary(grouping: compensations.all, by: { $0.correlationid ?? "" })
        let repeated = try #require(byInstance.values.first(where: { $0.count == 2 }), "\(ids)")
        #expect(repeated[0].id == repeated[1].id)
        #expect(Set(compensations.all.map(\.id)).count == 2, "\(ids)")
    }
}

import Herald
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

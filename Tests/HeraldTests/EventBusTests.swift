import Herald
import Metrics
import MetricsTestKit
import Testing

@Suite("Event bus")
struct EventBusTests {
    @Test func publishRunsHandlersByPriorityThenSubscriptionOrder() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let order = Recorder<String>()
        bus.subscribe(Ping.self, name: "low") { _, _ in order.append("low") }
        bus.subscribe(Ping.self, name: "high", priority: 10) { _, _ in order.append("high") }
        bus.subscribe(Ping.self, name: "low2") { _, _ in order.append("low2") }
        bus.subscribe(Ping.self, name: "mid", priority: 5) { _, _ in order.append("mid") }
        let result = try await bus.publish(Ping(number: 1))
        #expect(order.all == ["high", "mid", "low", "low2"])
        #expect(result.handlers == ["high", "mid", "low", "low2"])
        #expect(result.succeeded)
    }

    @Test func publishReturnsOnlyAfterAsyncHandlersFinish() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let done = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, _ in
            try await Task.sleep(for: .milliseconds(20))
            done.append(ping.number)
        }
        try await bus.publish(Ping(number: 7))
        #expect(done.all == [7])
    }

    struct Doubler: EventHandler {
        let seen: Recorder<Int>
        func handle(_ event: Ping, context: EventContext) async throws { seen.append(event.number * 2) }
    }

    @Test func handlerTypesAndClosuresBothSubscribe() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let seen = Recorder<Int>()
        bus.subscribe(Doubler(seen: seen))
        bus.subscribe(Ping.self) { ping, _ in seen.append(ping.number) }
        try await bus.publish(Ping(number: 3))
        #expect(seen.all == [6, 3])
    }

    @Test func cancelledSubscriptionsStopReceivingAtRunTime() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let seen = Recorder<Int>()
        let subscription = bus.subscribe(Ping.self) { ping, _ in seen.append(ping.number) }
        try await bus.publish(Ping(number: 1))
        subscription.cancel()
        subscription.cancel()
        try await bus.publish(Ping(number: 2))
        bus.subscribe(Ping.self) { ping, _ in seen.append(ping.number * 10) }
        try await bus.publish(Ping(number: 3))
        #expect(seen.all == [1, 30])
    }

    @Test func catchAllAndPrefixSubscriptionsSeeMatchingTypes() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let all = Recorder<String>()
        let prefixed = Recorder<String>()
        bus.subscribe(.all) { event, _ in all.append(event.type) }
        bus.subscribe(.prefix("com.example.po")) { event, _ in prefixed.append(event.type) }
        try await bus.publish(Ping(number: 1))
        try await bus.publish(Pong(number: 1))
        try await bus.publish(CloudEvent(source: "x", type: "org.other.thing"))
        #expect(all.all == [Ping.eventType, Pong.eventType, "org.other.thing"])
        #expect(prefixed.all == [Pong.eventType])
    }

    @Test func oneFailureNeverStopsTheOthersAndSurfacesEverywhere() async throws {
        let deadLetters = InMemoryDeadLetters()
        let bus = EventBus(
            configuration: .init(source: "test", strategy: .immediate, deadLetters: deadLetters))
        let seen = Recorder<String>()
        bus.subscribe(Ping.self, name: "first") { _, _ in seen.append("first") }
        bus.subscribe(Ping.self, name: "failing-\(#line)") { _, _ in throw TestFailure() }
        bus.subscribe(Ping.self, name: "last") { _, _ in seen.append("last") }
        let result = try await bus.publish(Ping(number: 1))
        #expect(seen.all == ["first", "last"])
        #expect(!result.succeeded)
        #expect(result.failures.count == 1)
        #expect(result.failures.first?.error as? TestFailure == TestFailure())
        #expect(result.outcomes.map(\.handler) == ["first", result.failures[0].handler, "last"])
        let letter = try #require(deadLetters.letters.first)
        #expect(letter.handler == result.failures[0].handler)
        #expect(letter.event.id == result.eventID)
        #expect(letter.attempts == 1)
    }

    @Test func responsesCarryCausationAndCorrelation() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let responses = Recorder<CloudEvent>()
        bus.subscribe(Ping.self) { ping, context in
            try await context.publish(Pong(number: ping.number))
        }
        bus.subscribe(.type(Pong.eventType)) { event, context in
            responses.append(event)
        }
        let first = try await bus.publish(Ping(number: 1), EventAttributes(correlationID: "order-9"))
        let second = try await bus.publish(Ping(number: 2))
        let (a, b) = (responses.all[0], responses.all[1])
        #expect(a.causationid == first.eventID.description)
        #expect(a.correlationid == "order-9")
        #expect(b.causationid == second.eventID.description)
        #expect(b.correlationid == second.eventID.description)
    }

    @Test func addressedEventsReachOnlyTheRecipientsHandlersAndCatchAll() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let seen = Recorder<String>()
        bus.subscribe(Ping.self, name: "payments", service: "payments") { _, _ in seen.append("payments") }
        bus.subscribe(Ping.self, name: "shipping", service: "shipping") { _, _ in seen.append("shipping") }
        bus.subscribe(.all, name: "audit", service: "audit") { _, _ in seen.append("audit") }
        try await bus.publish(Ping(number: 1), EventAttributes(recipient: "payments"))
        #expect(seen.all == ["payments", "audit"])
        try await bus.publish(Ping(number: 2))
        #expect(seen.all == ["payments", "audit", "payments", "shipping", "audit"])
    }

    @Test func postWithRejectBackPressureSaysQueueFull() async throws {
        let gate = Gate()
        let bus = EventBus(
            configuration: .init(source: "test", strategy: .sequential, queueCapacity: 4, backPressure: .reject))
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, _ in
            await gate.wait()
            seen.append(ping.number)
        }
        try await bus.post(Ping(number: 0))
        try await eventually { gate.arrived == 1 }
        for number in 1...4 { try await bus.post(Ping(number: number)) }
        await #expect {
            try await bus.post(Ping(number: 5))
        } throws: { ($0 as? EventBusError)?.code == .queueFull }
        gate.open()
        await bus.drain()
        #expect(seen.all == [0, 1, 2, 3, 4])
    }

    @Test func postWithSuspendBackPressureWaitsAndLosesNothing() async throws {
        let bus = EventBus(
            configuration: .init(source: "test", strategy: .fifo(workers: 2), queueCapacity: 8, backPressure: .suspend))
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, _ in
            try await Task.sleep(for: .microseconds(50))
            seen.append(ping.number)
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for producer in 0..<4 {
                group.addTask {
                    for number in 0..<250 { try await bus.post(Ping(number: producer * 1000 + number)) }
                }
            }
            try await group.waitForAll()
        }
        await bus.drain()
        #expect(seen.count == 1000)
        #expect(Set(seen.all).count == 1000)
    }

    @Test func drainFinishesAcceptedWorkIncludingFollowUps() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 2))
        let pongs = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, context in try await context.post(Pong(number: ping.number)) }
        bus.subscribe(Pong.self) { pong, _ in
            try await Task.sleep(for: .microseconds(10))
            pongs.append(pong.number)
        }
        for number in 0..<2000 { try await bus.post(Ping(number: number)) }
        await bus.drain()
        #expect(pongs.count == 2000)
    }

    @Test func shutdownHandlesEverythingAcceptedThenRefuses() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 2))
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, _ in seen.append(ping.number) }
        for number in 0..<500 { try await bus.post(Ping(number: number)) }
        await bus.shutdown()
        #expect(seen.count == 500)
        await #expect {
            try await bus.post(Ping(number: 501))
        } throws: { ($0 as? EventBusError)?.code == .shutDown }
    }

    @Test func shutdownAlsoFinishesWhatHandlersPostMeanwhile() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 2))
        let pongs = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, context in try await context.post(Pong(number: ping.number)) }
        bus.subscribe(Pong.self) { pong, _ in pongs.append(pong.number) }
        for number in 0..<300 { try await bus.post(Ping(number: number)) }
        await bus.shutdown()
        #expect(pongs.count == 300)
    }

    @Test func aBusThatWasShutDownIsFreed() async throws {
        weak var weakBus: EventBus?
        do {
            let bus = EventBus(source: "test", strategy: .fifo(workers: 2))
            bus.subscribe(Ping.self, strategy: .sequential) { _, _ in }
            bus.subscribe(Ping.self) { _, _ in }
            try await bus.post(Ping(number: 1))
            await bus.shutdown()
            weakBus = bus
        }
        try await eventually(.seconds(5), "the bus to be freed") { weakBus == nil }
    }

    @Test func failuresAreCountedInMetrics() async throws {
        try await TestBootstrap.metrics { metrics in
            let bus = EventBus(source: "test", strategy: .immediate)
            let name = "metrics-failing-\(EventID())"
            bus.subscribe(Ping.self, name: name) { _, _ in throw TestFailure() }
            try await bus.publish(Ping(number: 1))
            try await bus.publish(Ping(number: 2))
            let counter = try metrics.expectCounter("herald_handler_failures_total", [("handler", name)])
            #expect(counter.totalValue == 2)
        }
    }
}

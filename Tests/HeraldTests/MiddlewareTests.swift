import Herald
import InMemoryTracing
import MetricsTestKit
import Testing
import Tracing

@Suite("Middleware")
struct MiddlewareTests {
    @Test func retryRetriesWithGrowingBackoffUntilSuccess() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let attempts = Recorder<UInt64>()
        bus.subscribe(Ping.self, middleware: [Retry(maxAttempts: 5, initialDelay: .milliseconds(5), jitter: 0)]) {
            _, _ in
            attempts.append(monotonicNanoseconds())
            if attempts.count < 3 { throw TestFailure() }
        }
        let result = try await bus.publish(Ping(number: 1))
        #expect(result.succeeded)
        let times = attempts.all
        #expect(times.count == 3)
        #expect(times[1] - times[0] >= 5_000_000)
        #expect(times[2] - times[1] >= 10_000_000)
        let retry = Retry(maxAttempts: 10, initialDelay: .milliseconds(10), multiplier: 2, maxDelay: .milliseconds(50))
        #expect(retry.baseDelay(afterAttempt: 1) == .milliseconds(10))
        #expect(retry.baseDelay(afterAttempt: 3) == .milliseconds(40))
        #expect(retry.baseDelay(afterAttempt: 6) == .milliseconds(50))
    }

    @Test func exhaustedRetriesAreDeadLetteredWithTheAttemptCount() async throws {
        let deadLetters = InMemoryDeadLetters()
        let bus = EventBus(configuration: .init(source: "test", strategy: .immediate, deadLetters: deadLetters))
        let calls = Recorder<Int>()
        bus.subscribe(Ping.self, middleware: [Retry(maxAttempts: 3, initialDelay: .milliseconds(1))]) { _, _ in
            calls.append(1)
            throw TestFailure(message: "always")
        }
        let result = try await bus.publish(Ping(number: 1))
        #expect(calls.count == 3)
        #expect(result.failures.first?.attempts == 3)
        #expect(result.failures.first?.error as? TestFailure == TestFailure(message: "always"))
        let letter = try #require(deadLetters.letters.first)
        #expect(letter.attempts == 3)
        #expect(letter.reason.contains("always"))
    }

    @Test func timeoutFailsASlowHandler() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        bus.subscribe(Ping.self, middleware: [Timeout(.milliseconds(20))]) { _, _ in
            try await Task.sleep(for: .seconds(30))
        }
        let clock = ContinuousClock()
        let start = clock.now
        let result = try await bus.publish(Ping(number: 1))
        #expect(result.failures.first?.error is HandlerTimeoutError)
        #expect(clock.now - start < .seconds(10))
    }

    @Test func deduplicateSkipsARepeatedSourceAndID() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self, middleware: [Deduplicate(window: .seconds(60))]) { ping, _ in seen.append(ping.number)
        }
        let event = CloudEvent(Ping(number: 1), source: "producer-a")
        try await bus.publish(event)
        try await bus.publish(event)
        var sameIDOtherSource = event
        sameIDOtherSource.source = "producer-b"
        try await bus.publish(sameIDOtherSource)
        #expect(seen.all == [1, 1])
    }

    @Test func deduplicateRunsAgainWhenTheFirstAttemptFailed() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let calls = Recorder<Int>()
        bus.subscribe(Ping.self, middleware: [Deduplicate()]) { _, _ in
            calls.append(1)
            if calls.count == 1 { throw TestFailure() }
        }
        let event = CloudEvent(Ping(number: 1), source: "p")
        #expect(try await !bus.publish(event).succeeded)
        #expect(try await bus.publish(event).succeeded)
        #expect(try await bus.publish(event).succeeded)
        #expect(calls.count == 2)
    }

    @Test func deduplicateHandlesConcurrentDuplicatesOnce() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 4))
        let calls = Recorder<Int>()
        bus.subscribe(Ping.self, middleware: [Deduplicate()]) { ping, _ in
            try await Task.sleep(for: .milliseconds(5))
            calls.append(ping.number)
        }
        let event = CloudEvent(Ping(number: 1), source: "p")
        for _ in 0..<20 { try await bus.post(event) }
        await bus.drain()
        #expect(calls.all == [1])
    }

    @Test func deduplicateForgetsAfterTheWindow() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let seen = Recorder<Int>()
        let dedup = Deduplicate(window: .milliseconds(20))
        bus.subscribe(Ping.self, middleware: [dedup]) { ping, _ in seen.append(ping.number) }
        let event = CloudEvent(Ping(number: 1), source: "p")
        try await bus.publish(event)
        try await Task.sleep(for: .milliseconds(40))
        try await bus.publish(event)
        #expect(seen.count == 2)
    }

    @Test func circuitBreakerOpensFailsFastAndRecovers() async throws {
        let bus = EventBus(source: "test", strategy: .immediate)
        let breaker = CircuitBreaker(failureThreshold: 3, cooldown: .milliseconds(50))
        let calls = Recorder<Int>()
        let healthy = Recorder<Bool>()
        bus.subscribe(Ping.self, middleware: [breaker]) { ping, _ in
            calls.append(ping.number)
            if healthy.count == 0 { throw TestFailure() }
        }
        for number in 0..<3 { try await bus.publish(Ping(number: number)) }
        #expect(calls.count == 3)
        let rejected = try await bus.publish(Ping(number: 3))
        #expect(rejected.failures.first?.error is CircuitOpenError)
        #expect(calls.count == 3, "an open circuit does not call the handler")
        healthy.append(true)
        try await Task.sleep(for: .milliseconds(60))
        let trial = try await bus.publish(Ping(number: 4))
        #expect(trial.succeeded)
        #expect(breaker.phase == .closed)
    }

    @Test func concurrencyLimitCapsParallelCalls() async throws {
        let bus = EventBus(source: "test", strategy: .fifo(workers: 8))
        let limit = ConcurrencyLimit(2)
        let probe = ConcurrencyProbe()
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self, middleware: [limit]) { ping, _ in
            probe.enter()
            try await Task.sleep(for: .milliseconds(1))
            probe.leave()
            seen.append(ping.number)
        }
        for number in 0..<64 { try await bus.post(Ping(number: number)) }
        await bus.drain()
        #expect(seen.count == 64)
        #expect(probe.peak <= 2)
        #expect(limit.peak == 2)
    }

    @Test func middlewareComposesOutermostFirst() async throws {
        struct Tag: EventMiddleware {
            let name: String
            let log: Recorder<String>
            func handle(
                _ event: CloudEvent, context: EventContext,
                next: @Sendable (CloudEvent, EventContext) async throws -> Void
            ) async throws {
                log.append(">" + name)
                try await next(event, context)
                log.append("<" + name)
            }
        }
        let log = Recorder<String>()
        let bus = EventBus(
            configuration: .init(source: "test", strategy: .immediate, middleware: [Tag(name: "bus", log: log)]))
        bus.subscribe(Ping.self, middleware: [Tag(name: "a", log: log), Tag(name: "b", log: log)]) { _, _ in
            log.append("handler")
        }
        try await bus.publish(Ping(number: 1))
        #expect(log.all == [">bus", ">a", ">b", "handler", "<b", "<a", "<bus"])
    }

    @Test func tracingContinuesTheTraceThroughResponses() async throws {
        let tracer = TestBootstrap.tracer
        let bus = EventBus(
            configuration: .init(source: "test", strategy: .immediate, middleware: [TracingMiddleware()]))
        let responses = Recorder<CloudEvent>()
        bus.subscribe(Ping.self) { ping, context in try await context.publish(Pong(number: ping.number)) }
        bus.subscribe(.type(Pong.eventType)) { event, _ in responses.append(event) }
        // The in-memory tracer propagates its own headers; Herald carries them as extensions like traceparent.
        let traceID = "trace-\(EventID())"
        let traceKey = CloudEventTraceInjector.extensionName(forKey: InMemoryTracer.traceIDKey)
        let spanKey = CloudEventTraceInjector.extensionName(forKey: InMemoryTracer.spanIDKey)
        var event = CloudEvent(Ping(number: 1), source: "client")
        event.extensions[traceKey] = .string(traceID)
        event.extensions[spanKey] = .string("caller-span")
        event.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        try await bus.publish(event)
        let response = try #require(responses.all.first)
        #expect(response.extensions[traceKey] == .string(traceID), "the response belongs to the same trace")
        let parentSpan = try #require(response.extensions[spanKey]?.description)
        #expect(parentSpan != "caller-span", "its parent is the handler's span, not the caller's")
        let spans = tracer.finishedSpans.filter { $0.spanContext.traceID == traceID }
        #expect(spans.contains { $0.spanContext.spanID == parentSpan })
        #expect(spans.allSatisfy { $0.kind == .consumer })
        // A W3C traceparent from the caller is carried on when the tracer does not write one itself.
        #expect(response.traceparent == event.traceparent)
    }

    @Test func loggingAndMetricsMiddlewarePassEventsThrough() async throws {
        try await TestBootstrap.metrics { metrics in
            let bus = EventBus(
                configuration: .init(
                    source: "test", strategy: .immediate, middleware: [LoggingMiddleware(), MetricsMiddleware()]))
            let name = "observed-\(EventID())"
            bus.subscribe(Ping.self, name: name) { ping, _ in if ping.number == 2 { throw TestFailure() } }
            try await bus.publish(Ping(number: 1))
            try await bus.publish(Ping(number: 2))
            let handled = try metrics.expectCounter(
                "herald_handled_total", [("handler", name), ("type", Ping.eventType)])
            let errors = try metrics.expectCounter(
                "herald_handler_errors_total", [("handler", name), ("type", Ping.eventType)])
            #expect(handled.totalValue == 1)
            #expect(errors.totalValue == 1)
        }
    }
}

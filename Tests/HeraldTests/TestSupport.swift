import Herald
import InMemoryTracing
import Instrumentation
import Metrics
import MetricsTestKit
import Synchronization

struct Ping: Event, Hashable {
    static let eventType = "com.example.ping"
    var number: Int
    var key: String?
    var partitionKey: String? { key }
}

struct Pong: Event, Hashable {
    static let eventType = "com.example.pong"
    var number: Int
}

struct TestFailure: Error, Equatable {
    var message = "boom"
}

/// Records values from any thread.
final class Recorder<Value: Sendable>: Sendable {
    private let values = Mutex<[Value]>([])
    func append(_ value: Value) { values.withLock { $0.append(value) } }
    var all: [Value] { values.withLock { $0 } }
    var count: Int { values.withLock { $0.count } }
}

/// Counts concurrent executions and remembers the peak.
final class ConcurrencyProbe: Sendable {
    private let state = Mutex<(now: Int, peak: Int)>((0, 0))
    func enter() {
        state.withLock {
            $0.now += 1; $0.peak = max($0.peak, $0.now)
        }
    }
    func leave() { state.withLock { $0.now -= 1 } }
    var peak: Int { state.withLock { $0.peak } }
}

/// A gate handlers wait at until the test opens it.
final class Gate: Sendable {
    private let state = Mutex<(open: Bool, waiters: [CheckedContinuation<Void, Never>], arrived: Int)>((false, [], 0))

    func wait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let open = state.withLock { state -> Bool in
                state.arrived += 1
                if state.open { return true }
                state.waiters.append(continuation)
                return false
            }
            if open { continuation.resume() }
        }
    }

    var arrived: Int { state.withLock { $0.arrived } }

    func open() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.open = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }
}

/// Polls until a condition holds, failing after a bound (tests stay bounded in time).
func eventually(
    _ limit: Duration = .seconds(10), _ what: String = "condition", _ condition: () -> Bool
) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now + limit
    while !condition() {
        guard clock.now < deadline else { throw TestFailure(message: "timed out waiting for \(what)") }
        try await Task.sleep(for: .milliseconds(2))
    }
}

/// Process-wide test backends for swift-metrics and swift-distributed-tracing (each can be bootstrapped once).
enum TestBootstrap {
    static let shared: (TestMetrics, InMemoryTracer) = {
        let metrics = TestMetrics()
        MetricsSystem.bootstrap(metrics)
        let tracer = InMemoryTracer()
        InstrumentationSystem.bootstrap(tracer)
        return (metrics, tracer)
    }()

    static func metrics(_ body: (TestMetrics) async throws -> Void) async throws {
        try await body(shared.0)
    }

    static var tracer: InMemoryTracer { shared.1 }
}

/// Runs `body`, failing instead of hanging if it takes longer than `limit` (a deadlock shows as a failure; the stuck
/// task is left behind rather than awaited).
func withDeadlineForTest(
    _ limit: Duration = .seconds(10), _ body: @escaping @Sendable () async throws -> Void
) async throws {
    let outcome = Recorder<Result<Void, any Error>>()
    Task {
        do {
            try await body()
            outcome.append(.success(()))
        } catch {
            outcome.append(.failure(error))
        }
    }
    try await eventually(limit, "completion (deadlock?)") { outcome.count > 0 }
    try outcome.all[0].get()
}

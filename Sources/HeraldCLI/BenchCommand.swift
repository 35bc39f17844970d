import ArgumentParser
import Herald
import Synchronization

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks that print numbers (run with -c release).",
        subcommands: [BusBench.self, BrokerBench.self, HTTPBench.self, NATSBench.self, OutboxBench.self]
    )
}

/// The middle value of a bench's rounds (0 for none).
func median(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
}

struct BenchEvent: Event {
    static let eventType = "com.herald.bench.event"
    var number: Int
    var sentAt: UInt64
    var key: String?
    var partitionKey: String? { key }
}

/// Times the in-process bus against a raw closure loop measured in the same run.
struct BusBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bus", abstract: "Benchmark the in-process bus and every dispatch strategy.")

    @Option(help: "Events per measurement.") var events = 2_000_000
    @Option(help: "Repetitions; the best is reported.") var repeats = 3
    @Option(help: "Events per second for the latency measurements.") var rate = 20_000
    @Option(help: "Which parts to run: all, publish, post, latency (or batch, parts).") var only = "all"

    func run() async throws {
        print("herald bench bus — \(events) events per run, best of \(repeats)")
        print("")
        let baseline = best { measureClosureLoop(events) }
        row("raw closure loop (baseline)", baseline, baseline)

        if only == "parts" {
            let n = events
            var start = monotonicNanoseconds()
            var sink = 0
            for number in 0..<n {
                let event = CloudEvent(BenchEvent(number: number, sentAt: 0), source: "bench")
                sink &+= event.type.utf8.count
            }
            print("  envelope creation: \(Double(monotonicNanoseconds() - start) / Double(n)) ns")
            start = monotonicNanoseconds()
            for _ in 0..<n { sink &+= Int(truncatingIfNeeded: EventID().unixMilliseconds ?? 0) }
            print("  EventID(): \(Double(monotonicNanoseconds() - start) / Double(n)) ns")
            let event = CloudEvent(BenchEvent(number: 1, sentAt: 0), source: "bench")
            start = monotonicNanoseconds()
            for _ in 0..<n {
                let copy = blackHole(event)
                sink &+= copy.source.utf8.count
            }
            print("  envelope copy: \(Double(monotonicNanoseconds() - start) / Double(n)) ns")
            print(sink > 0 ? "" : "-")
            return
        }
        if only == "all" || only == "publish" {
            try await runPublish(baseline)
        }
        if only == "all" || only == "post" || only == "latency" || only == "batch" {
            try await runPost(baseline)
        }
    }

    func runPublish(_ baseline: Double) async throws {
        let publish1 = try await bestAsync { try await measurePublish(handlers: 1, count: events) }
        row("sync publish → 1 handler", publish1, baseline)
        let publish4 = try await bestAsync { try await measurePublish(handlers: 4, count: events) }
        row("sync publish → 4 handlers", publish4, baseline)
    }

    func runPost(_ baseline: Double) async throws {
        print("")
        print("posted across threads (producer task → workers), drained:")
        let strategies: [(String, DispatchStrategy, Bool)] = [
            ("fifo(workers: 2)", .fifo(workers: 2), false),
            ("fifo(workers: 1)", .fifo(workers: 1), false),
            ("sequential", .sequential, false),
            ("partitioned(lanes: 2)", .partitioned(lanes: 2, parkFailingKeys: false), true),
            ("partitioned(lanes: 4)", .partitioned(lanes: 4, parkFailingKeys: false), true),
            ("leastLoaded(workers: 2)", .leastLoaded(workers: 2), false),
            ("priority(workers: 2)", .priority(workers: 2), false),
            (
                "eventTime(lateness: 0)", .eventTime(lateness: .zero, maxHold: .milliseconds(1), latePolicy: .deliver),
                false
            ),
            ("immediate (post inline)", .immediate, false),
        ]
        if only == "batch" {
            let batched = try await bestAsync {
                try await measurePostBatches(.fifo(workers: 1), count: events, batch: 256)
            }
            row("fifo(workers: 1), batches of 256", batched, baseline)
            return
        }
        if only != "latency" {
            let batched = try await bestAsync {
                try await measurePostBatches(.fifo(workers: 1), count: events, batch: 256)
            }
            row("fifo(workers: 1), batches of 256", batched, baseline)
            let batched2 = try await bestAsync {
                try await measurePostBatches(.fifo(workers: 2), count: events, batch: 256)
            }
            row("fifo(workers: 2), batches of 256", batched2, baseline)
            let partitioned = try await bestAsync {
                try await measurePostBatches(.partitioned(lanes: 2, parkFailingKeys: false), count: events, batch: 256)
            }
            row("partitioned(2), batches of 256", partitioned, baseline)
        }
        for (name, strategy, keyed) in strategies where only != "latency" {
            let count = name.hasPrefix("priority") || name.hasPrefix("eventTime") ? events / 4 : events
            let rate = try await bestAsync { try await measurePost(strategy, count: count, keyed: keyed) }
            row(name, rate, baseline)
        }

        guard only != "post" else { return }
        print("")
        print("dispatch latency at \(rate) events/s (post → handler start), 1 s per strategy:")
        for (name, strategy, keyed) in strategies {
            let (p50, p99) = try await measureLatency(strategy, rate: rate, keyed: keyed)
            print("  \(pad(name, 30)) p50 \(format(p50 / 1000, 1)) µs   p99 \(format(p99 / 1000, 1)) µs")
        }
    }

    func row(_ name: String, _ rate: Double, _ baseline: Double) {
        print(
            "  \(pad(name, 30)) \(pad(format(rate / 1e6, 2), 7)) M events/s   ratio to baseline \(format(rate / baseline, 3))"
        )
    }

    func best(_ body: () -> Double) -> Double {
        (0..<repeats).map { _ in body() }.max()!
    }

    func bestAsync(_ body: () async throws -> Double) async throws -> Double {
        var result = 0.0
        for _ in 0..<repeats { result = max(result, try await body()) }
        return result
    }
}

/// Calls an opaque closure `count` times: the cost floor of invoking a handler at all.
@inline(never)
func measureClosureLoop(_ count: Int) -> Double {
    let total = Atomic<Int>(0)
    let handler: @Sendable (BenchEvent) -> Void = { event in total.add(event.number & 1, ordering: .relaxed) }
    let opaque = blackHole(handler)
    let start = monotonicNanoseconds()
    for number in 0..<count { opaque(BenchEvent(number: number, sentAt: 0)) }
    let elapsed = monotonicNanoseconds() - start
    precondition(total.load(ordering: .relaxed) == count / 2)
    return Double(count) / (Double(elapsed) / 1e9)
}

@inline(never)
func blackHole<T>(_ value: T) -> T { value }

func measurePublish(handlers: Int, count: Int) async throws -> Double {
    let bus = EventBus(source: "bench", strategy: .immediate)
    let total = Counter()
    for _ in 0..<handlers {
        bus.subscribe(BenchEvent.self) { event, _ in total.add(event.number & 1) }
    }
    let start = monotonicNanoseconds()
    for number in 0..<count { try await bus.publish(BenchEvent(number: number, sentAt: 0)) }
    let elapsed = monotonicNanoseconds() - start
    precondition(total.value == handlers * (count / 2))
    return Double(count) / (Double(elapsed) / 1e9)
}

func measurePost(_ strategy: DispatchStrategy, count: Int, keyed: Bool) async throws -> Double {
    try await measureDrained(strategy, count: count) { bus, keys in
        for number in 0..<count {
            try await bus.post(BenchEvent(number: number, sentAt: 0, key: keyed ? keys[number & 63] : nil))
        }
    }
}

func measurePostBatches(_ strategy: DispatchStrategy, count: Int, batch: Int) async throws -> Double {
    try await measureDrained(strategy, count: count) { bus, keys in
        var events: [CloudEvent] = []
        events.reserveCapacity(batch)
        var number = 0
        while number < count {
            events.removeAll(keepingCapacity: true)
            for _ in 0..<min(batch, count - number) {
                events.append(
                    CloudEvent(BenchEvent(number: number, sentAt: 0, key: keys[number & 63]), source: "bench"))
                number += 1
            }
            try await bus.post(contentsOf: events)
        }
    }
}

/// Events per second for posting `count` events to one counting handler with `post`, until drained.
func measureDrained(
    _ strategy: DispatchStrategy, count: Int, post: (EventBus, [String]) async throws -> Void
) async throws -> Double {
    let bus = EventBus(configuration: .init(source: "bench", strategy: strategy, queueCapacity: 1 << 16))
    let total = Counter()
    bus.subscribe(BenchEvent.self) { _, _ in total.add(1) }
    let keys = (0..<64).map { "key-\($0)" }
    let start = monotonicNanoseconds()
    try await post(bus, keys)
    await bus.drain()
    let elapsed = monotonicNanoseconds() - start
    precondition(total.value == count)
    await bus.shutdown()
    return Double(count) / (Double(elapsed) / 1e9)
}

func measureLatency(_ strategy: DispatchStrategy, rate: Int, keyed: Bool) async throws -> (Double, Double) {
    let bus = EventBus(configuration: .init(source: "bench", strategy: strategy))
    let samples = Mutex<[UInt64]>([])
    samples.withLock { $0.reserveCapacity(rate + 16) }
    bus.subscribe(BenchEvent.self) { event, _ in
        let latency = monotonicNanoseconds() &- event.sentAt
        samples.withLock { $0.append(latency) }
    }
    // Paced in 1 ms ticks: rate/1000 events each tick, for one second.
    let perTick = max(1, rate / 1000)
    let start = monotonicNanoseconds()
    var sent = 0
    for tick in 0..<1000 {
        let due = start + UInt64(tick) * 1_000_000
        while monotonicNanoseconds() < due { await Task.yield() }
        for _ in 0..<perTick {
            try await bus.post(
                BenchEvent(number: sent, sentAt: monotonicNanoseconds(), key: keyed ? "k\(sent & 15)" : nil))
            sent += 1
        }
    }
    await bus.drain()
    await bus.shutdown()
    let sorted = samples.withLock { $0 }.sorted()
    func at(_ p: Double) -> Double { Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) }
    return (at(0.5), at(0.99))
}

final class Counter: Sendable {
    private let atomic = Atomic<Int>(0)
    func add(_ value: Int) { atomic.add(value, ordering: .relaxed) }
    var value: Int { atomic.load(ordering: .relaxed) }
}

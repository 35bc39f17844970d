import Foundation
import Herald
import HeraldAuth
import HeraldBroker
import Prometheus
import Synchronization

/// The broker's Prometheus metrics (`GET /metrics`).
///
/// Measured as they happen (a registry of swift-prometheus collectors): events published over HTTP, publish
/// latency (request received → durable ack), end-to-end latency (event `time` → handed to an HTTP consumer, a
/// stream or a push endpoint), open HTTP connections. Read from the engine at scrape time: per topic the end
/// offsets (their rate is the publish rate of every interface), per group lag, pending, delivered,
/// redelivered, dead-lettered and acked.
public final class BrokerMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let publishLatency: DurationHistogram
    let endToEndLatency: DurationHistogram
    let httpConnections: ConnectionGauge
    /// Per-topic publish counters, made once (asking the registry each time costs a lock and a lookup).
    private let publishedCounters = Mutex<[String: Counter]>([:])
    private static let buckets: [Duration] = [
        .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
        .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
        .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
    ]

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        publishLatency = registry.makeDurationHistogram(
            descriptor: MetricNameDescriptor(
                metricName: "herald_http_publish", unitName: "seconds",
                helpText: "HTTP publish: request received to durable ack"),
            buckets: Self.buckets)
        endToEndLatency = registry.makeDurationHistogram(
            descriptor: MetricNameDescriptor(
                metricName: "herald_end_to_end", unitName: "seconds",
                helpText: "Event time to delivery to an HTTP consumer, stream or push endpoint"),
            buckets: Self.buckets)
        httpConnections = ConnectionGauge(
            registry.makeGauge(
                descriptor: MetricNameDescriptor(
                    metricName: "herald_http", unitName: "connections", helpText: "Open HTTP connections")))
    }

    func published(_ count: Int, topic: String, latency: Duration) {
        let counter =
            publishedCounters.withLock { $0[topic] }
            ?? {
                let made = registry.makeCounter(
                    descriptor: MetricNameDescriptor(
                        metricName: "herald_http_published_events", unitName: "total",
                        helpText: "Events published over HTTP"),
                    labels: [("topic", topic)])
                publishedCounters.withLock { $0[topic] = made }
                return made
            }()
        counter.increment(by: Int64(count))
        publishLatency.record(latency)
    }

    func delivered(_ event: CloudEvent, topic: String) {
        guard let time = event.time else { return }
        let nanoseconds = Timestamp.now().nanosecondsSinceEpoch - time.nanosecondsSinceEpoch
        if nanoseconds >= 0 { endToEndLatency.recordNanoseconds(nanoseconds) }
    }

    /// The exposition text: the registry's collectors, then the engine's counters for the topics `principal`
    /// may administer.
    func exposition(broker: Broker, visible principal: Principal) -> [UInt8] {
        var text = registry.emitToBuffer()
        var lines: [String] = []
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(labels: String, value: String)]) {
            guard !samples.isEmpty else { return }
            lines.append("# HELP \(name) \(help)")
            lines.append("# TYPE \(name) \(type)")
            for sample in samples { lines.append("\(name){\(sample.labels)} \(sample.value)") }
        }
        let topics = broker.topics().filter { principal.permissions.allows(.admin, on: $0.name) }
        family(
            "herald_topic_end_offset", "counter", "Next offset per partition (its rate is the publish rate)",
            topics.flatMap { topic in
                topic.endOffsets.enumerated().map {
                    (#"topic="\#(escape(topic.name))",partition="\#($0.offset)""#, "\($0.element)")
                }
            })
        family(
            "herald_topic_bytes", "gauge", "Bytes stored per topic",
            topics.map { (#"topic="\#(escape($0.name))""#, "\($0.bytes)") })
        let groups = broker.allGroups().filter { principal.permissions.allows(.admin, on: $0.topic) }
        func groupFamily(_ name: String, _ type: String, _ help: String, _ value: (GroupInfo) -> Int64) {
            family(
                name, type, help,
                groups.map { (#"topic="\#(escape($0.topic))",group="\#(escape($0.group))""#, "\(value($0))") })
        }
        groupFamily("herald_group_lag", "gauge", "Events not yet delivered to the group") { $0.lag }
        groupFamily("herald_group_pending", "gauge", "Delivered and unsettled, or waiting for redelivery") {
            Int64($0.pending)
        }
        groupFamily("herald_group_delivered_total", "counter", "Deliveries since start") { Int64($0.delivered) }
        groupFamily("herald_group_redelivered_total", "counter", "Redeliveries since start") { Int64($0.redelivered) }
        groupFamily("herald_group_dead_lettered_total", "counter", "Dead letters since start") {
            Int64($0.deadLettered)
        }
        groupFamily("herald_group_acked_total", "counter", "Acks since start") { Int64($0.acked) }
        groupFamily("herald_group_members", "gauge", "Connected members") { Int64($0.members) }
        text += Array((lines.joined(separator: "\n") + (lines.isEmpty ? "" : "\n")).utf8)
        return text
    }

    private func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }
}

/// Counts open connections into a gauge.
final class ConnectionGauge: Sendable {
    let gauge: Gauge
    private let count = Atomic<Int>(0)

    init(_ gauge: Gauge) {
        self.gauge = gauge
    }

    func opened() { gauge.set(Int64(count.add(1, ordering: .relaxed).newValue)) }
    func closed() { gauge.set(Int64(count.subtract(1, ordering: .relaxed).newValue)) }
}

import Foundation
import Herald
import HeraldBroker
import HeraldWire
import Logging
import Synchronization

/// Serves push groups: for each group with a `push.url`, a member that POSTs every delivery to the URL in
/// CloudEvents binary mode. A 2xx response acks; a response with `herald-settlement: terminate` dead-letters it at
/// once; any other status, a timeout or a refused connection nacks with the group's backoff, so the broker
/// redelivers and, after `maxDeliver` attempts, dead-letters it.
final class PushDispatcher: Sendable {
    let broker: Broker
    let client: HTTPClient
    let metrics: BrokerMetrics
    let logger: Logger
    /// Concurrent POSTs per push group (ordered groups still keep one per key in flight).
    let concurrency = 32
    private let running = Mutex<[String: Pusher]>([:])

    init(broker: Broker, client: HTTPClient, metrics: BrokerMetrics, logger: Logger) {
        self.broker = broker
        self.client = client
        self.metrics = metrics
        self.logger = logger
    }

    /// Follows the broker's push groups (created, re-pointed, deleted) until cancelled.
    func run() async {
        while !Task.isCancelled {
            reconcile()
            try? await Task.sleep(for: .milliseconds(200))
        }
        let all = running.withLock { running in
            defer { running = [:] }
            return Array(running.values)
        }
        for pusher in all { pusher.stop(broker: broker) }
        client.shutdown()
    }

    func reconcile() {
        let wanted = Dictionary(
            broker.pushGroups().map { ("\($0.topic)\u{0}\($0.group)", $0) }, uniquingKeysWith: { first, _ in first })
        let (stale, missing) = running.withLock { running -> ([Pusher], [PushGroup]) in
            var stale: [Pusher] = []
            for (key, pusher) in running where wanted[key] != pusher.group {
                stale.append(pusher)
                running.removeValue(forKey: key)
            }
            return (stale, wanted.filter { running[$0.key] == nil }.map(\.value))
        }
        for pusher in stale { pusher.stop(broker: broker) }
        for group in missing {
            do {
                let pusher = try Pusher(group: group, dispatcher: self)
                running.withLock { $0["\(group.topic)\u{0}\(group.group)"] = pusher }
            } catch {
                logger.warning("cannot start a push group", metadata: ["group": "\(group.group)", "error": "\(error)"])
            }
        }
    }

    /// One push group: a buffered member and `concurrency` workers that POST.
    final class Pusher: Sendable {
        let group: PushGroup
        let member: BufferedMember
        let memberID: Int
        let workers: Mutex<[Task<Void, Never>]>

        init(group: PushGroup, dispatcher: PushDispatcher) throws {
            self.group = group
            let concurrency = dispatcher.concurrency
            member = BufferedMember(bound: concurrency)
            memberID = try dispatcher.broker.subscribe(
                GroupSettings().subscribeRequest(
                    topic: group.topic, group: group.group, maxInFlight: UInt32(concurrency)),
                member: member)
            workers = Mutex([])
            let member = self.member
            let memberID = self.memberID
            let tasks = (0..<concurrency).map { _ in
                Task {
                    while !Task.isCancelled {
                        guard let delivery = member.take(1).first else {
                            if member.state.withLock({ $0.closed }) { return }
                            await member.wait(until: ContinuousClock.now + .seconds(1))
                            continue
                        }
                        await dispatcher.push(delivery, group: group, memberID: memberID)
                    }
                }
            }
            workers.withLock { $0 = tasks }
        }

        func stop(broker: Broker) {
            member.close()
            workers.withLock { $0.forEach { $0.cancel() } }
            broker.unsubscribe(member: memberID)
        }
    }

    func push(_ delivery: WireDelivery, group: PushGroup, memberID: Int) async {
        let id = AckID(delivery)
        let settlement: WireSettlement
        do {
            let event = try BinaryEvent.decode(delivery.event)
            let (headers, body) = try CloudEventHTTPBinding.encodeBinary(event)
            let response = try await client.request(
                "POST", group.url, headers: headers + [("herald-delivery-attempt", String(delivery.attempt))],
                body: body)
            if (200..<300).contains(response.status) {
                metrics.delivered(event, topic: group.topic)
                settlement = .ack
            } else if response.header("herald-settlement") == "terminate" {
                // The receiver says retrying cannot help (see HTTPTransport): dead-letter it now.
                let reason = String(decoding: response.body.prefix(1000), as: UTF8.self)
                settlement = .terminate(reason: "the push endpoint refused it: \(reason)")
            } else {
                // A Herald receiver may ask for its own redelivery delay (a nack with a delay).
                let delay = response.header("herald-retry-after-ms").flatMap { UInt32($0) }
                settlement = .nack(delayMilliseconds: delay ?? backoff(group, attempt: delivery.attempt))
                logger.debug("push refused", metadata: ["url": "\(group.url)", "status": "\(response.status)"])
            }
        } catch {
            settlement = .nack(delayMilliseconds: backoff(group, attempt: delivery.attempt))
            logger.debug("push failed", metadata: ["url": "\(group.url)", "error": "\(error)"])
        }
        _ = broker.settle(member: memberID, [id.item(settlement)])
    }

    func backoff(_ group: PushGroup, attempt: UInt32) -> UInt32 {
        let steps = group.backoffMilliseconds
        guard !steps.isEmpty else { return 0 }
        return steps[min(Int(attempt) - 1, steps.count - 1)]
    }
}

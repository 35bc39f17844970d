import Herald
import Logging
import ServiceLifecycle
import Testing

@Suite("Running as a service")
struct ServiceLifecycleTests {
    @Test func gracefulShutdownDrainsTheBusAndStopsTheSagaManager() async throws {
        let transport = InMemoryTransport()
        let bus = EventBus(
            configuration: .init(
                source: "svc", strategy: .fifo(workers: 2), transport: TransportLink(transport, topic: "t")))
        let sagas = SagaManager(PingPongSaga(), store: InMemorySagaStore(), bus: bus, timeoutInterval: .milliseconds(5))
        sagas.start()
        let seen = Recorder<Int>()
        bus.subscribe(Ping.self) { ping, _ in seen.append(ping.number) }
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: bus), .init(service: sagas)], logger: Logger(label: "test")))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            for number in 0..<50 {
                try await bus.post(Ping(number: number), EventAttributes(correlationID: "c\(number % 5)"))
            }
            try await eventually { seen.count == 50 }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        #expect(seen.count == 50)
        await #expect {
            try await bus.post(CloudEvent(source: "x", type: Ping.eventType))
        } throws: { ($0 as? EventBusError)?.code == .shutDown }
        await transport.shutdown()
    }
}

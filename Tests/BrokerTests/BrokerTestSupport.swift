import Foundation
import Herald
import HeraldBroker
import HeraldClient
import NIOPosix

/// A broker with its TCP server on an ephemeral port and a fresh data directory, for one test.
final class TestBroker: Sendable {
    let directory: String
    let broker: Broker
    let server: BrokerServer
    let port: Int
    let ticker: Task<Void, Never>

    init(directory: String? = nil, configure: (inout BrokerConfiguration) -> Void = { _ in }) async throws {
        let directory = directory ?? TestBroker.temporaryDirectory()
        var configuration = BrokerConfiguration(dataDirectory: directory)
        configuration.tick = .milliseconds(5)
        configure(&configuration)
        self.directory = directory
        broker = try Broker(configuration: configuration)
        server = BrokerServer(broker: broker, port: 0)
        port = try await server.start()
        let broker = self.broker
        ticker = Task {
            while !Task.isCancelled {
                broker.tick()
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
    }

    func transport() -> BrokerTransport {
        BrokerTransport(host: "127.0.0.1", port: port, clientName: "test")
    }

    /// Stops serving and closes the logs (the directory stays, for a restart).
    func stop() async {
        ticker.cancel()
        await server.stop()
        broker.close()
    }

    static func temporaryDirectory() -> String {
        let path = NSTemporaryDirectory() + "herald-test-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }
}

func sampleEvent(_ index: Int, key: String? = nil, source: String = "test") -> CloudEvent {
    var event = CloudEvent(source: source, type: "com.example.sample", data: .bytes(Array("event \(index)".utf8)))
    event.datacontenttype = "text/plain"
    event.partitionkey = key
    return event
}

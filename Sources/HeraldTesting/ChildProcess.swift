import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// A child process a test starts, kills with SIGKILL and starts again, always by its own pid. One task drives it at
/// a time.
public final class ChildProcess: @unchecked Sendable {
    public let executable: String
    public let arguments: [String]
    /// Send its standard output to /dev/null.
    public let quiet: Bool
    // Only the driving task touches `process`.
    private var process: Process?

    public init(executable: String, arguments: [String], quiet: Bool = false) {
        self.executable = executable
        self.arguments = arguments
        self.quiet = quiet
    }

    /// The `herald` executable, built next to the test bundle (`swift build --build-tests`).
    public static var heraldExecutable: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("herald").path
    }

    public var isRunning: Bool { process?.isRunning ?? false }

    public func start() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if quiet { process.standardOutput = FileHandle.nullDevice }
        try process.run()
        self.process = process
    }

    /// SIGKILL, then waits for it to be gone.
    public func kill9() {
        guard let process else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        self.process = nil
    }

    /// SIGTERM, then waits for it to exit.
    public func stop() {
        guard let process else { return }
        process.terminate()
        process.waitUntilExit()
        self.process = nil
    }
}

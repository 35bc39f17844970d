import HeraldWire
import NIOCore

/// libFuzzer entry: splits the input into frames and parses each; every outcome but a crash, a hang or an
/// allocation beyond the frame limit is fine. The server state machine sees each frame as a connection would.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var buffer = ByteBuffer(bytes: UnsafeBufferPointer(start: data, count: size))
    let decoder = FrameDecoder(maxFrameSize: 64 * 1024)
    var server = ServerConnectionStateMachine(
        welcome: Welcome(server: "fuzz", maxFrameSize: 64 * 1024, maxEventSize: 32 * 1024))
    var client = ClientConnectionStateMachine()
    _ = client.connected(Hello(client: "fuzz"))
    while true {
        guard let frame = try? decoder.next(&buffer) else { break }
        _ = server.received(frame)
        _ = client.received(frame)
        if case .publish(_, let events)? = try? Message(frame: frame) {
            for event in events {
                _ = try? BinaryEvent.summary(event.headers)
                _ = try? BinaryEvent.decode(event)
            }
        }
    }
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
) -> CInt

/// SwiftPM links an executable's entry point as `<module>_main`; hand control to libFuzzer's driver from there.
@_cdecl("WireFuzz_main")
public func wireFuzzMain(
    _ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
) -> CInt {
    var argc = argc
    var argv = argv
    return runFuzzerDriver(&argc, &argv) { data, size in fuzz(data, size) }
}

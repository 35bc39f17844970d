import HeraldNATS
import NIOCore

/// libFuzzer entry for the NATS protocol parser: the input arrives in pieces (sizes from its first byte), as reads
/// from a socket would; every outcome but a crash, a hang or an allocation beyond the limits is fine. Header blocks
/// of messages are parsed again on their own, and client operations are written for what was parsed.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    guard let first = bytes.first else { return 0 }
    let step = Int(first % 16) + 1
    var parser = NATSParser(maxControlLine: 4096, maxPayload: 64 * 1024)
    var buffer = ByteBuffer()
    var start = 1
    loop: while start < size {
        let end = min(size, start + step)
        buffer.writeBytes(UnsafeBufferPointer(rebasing: bytes[start..<end]))
        start = end
        while true {
            let operation: NATSServerOperation?
            do {
                operation = try parser.next(&buffer)
            } catch {
                break loop
            }
            guard let operation else { break }
            if case .message(let message) = operation {
                var out = ByteBuffer()
                try? NATSClientOperation.publish(
                    subject: message.subject, replyTo: message.replyTo, headers: message.headers,
                    payload: message.payload
                ).write(to: &out)
                if let block = try? message.headers?.encoded() { _ = try? NATSHeaders.parse(block) }
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
@_cdecl("NATSFuzz_main")
public func natsFuzzMain(
    _ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
) -> CInt {
    var argc = argc
    var argv = argv
    return runFuzzerDriver(&argc, &argv) { data, size in fuzz(data, size) }
}

// The benchmark's no-op ext_proc processor in C++: every ProcessingRequest gets the empty
// ProcessingResponse of the same kind (request_headers -> request_headers, and so on).
//
//     cpp-processor PORT        (SIGTERM or SIGINT stops it)
//
// A Python processor costs about as much CPU per message as the proxy it serves, and it
// shares a CPU with wrk and nginx; this one costs a fraction of that. It uses grpc++'s generic
// async API with one completion-queue thread driving every stream (the callback API hands
// each operation to another thread and costs more), so it needs no generated code: it reads
// the top-level protobuf fields of each raw request to find which oneof is set, and answers
// with two bytes.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <pthread.h>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr char kMethod[] = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

// ProcessingRequest's oneof "request" spans fields 2 (request_headers) to 7
// (response_trailers); ProcessingResponse's matching fields are one lower (1 to 6).
constexpr uint64_t kFirstRequestField = 2;
constexpr uint64_t kLastRequestField = 7;
// Calls requested from the server ahead of clients.
constexpr int kCallsAhead = 32;
constexpr int kWireVarint = 0, kWireFixed64 = 1, kWireLengthDelimited = 2, kWireFixed32 = 5;

// Each reply is one empty length-delimited field: its key byte, then length 0.
constexpr uint8_t kReplies[][2] = {
    {(1 << 3) | kWireLengthDelimited, 0}, {(2 << 3) | kWireLengthDelimited, 0},
    {(3 << 3) | kWireLengthDelimited, 0}, {(4 << 3) | kWireLengthDelimited, 0},
    {(5 << 3) | kWireLengthDelimited, 0}, {(6 << 3) | kWireLengthDelimited, 0},
};

// Reads a serialized message across the slices of a ByteBuffer: body chunks arrive in
// several slices, and copying them whole just to skip them would cost more than the reply.
class Cursor {
 public:
  explicit Cursor(const grpc::ByteBuffer& buffer) { ok_ = buffer.Dump(&slices_).ok(); }

  bool Varint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t byte;
      if (!Byte(&byte)) return false;
      *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }

  bool Skip(uint64_t count) {
    while (count > 0) {
      if (!ok_ || index_ >= slices_.size()) return false;
      const uint64_t left = slices_[index_].size() - offset_;
      if (count < left) {
        offset_ += count;
        return true;
      }
      count -= left;
      ++index_;
      offset_ = 0;
    }
    return true;
  }

 private:
  bool Byte(uint8_t* byte) {
    while (ok_ && index_ < slices_.size() && offset_ == slices_[index_].size()) {
      ++index_;
      offset_ = 0;
    }
    if (!ok_ || index_ >= slices_.size()) return false;
    *byte = slices_[index_].begin()[offset_++];
    return true;
  }

  std::vector<grpc::Slice> slices_;
  bool ok_ = false;
  size_t index_ = 0;
  size_t offset_ = 0;
};

// The oneof field set in a serialized ProcessingRequest, or 0 when none is (or it is garbled).
uint64_t RequestField(const grpc::ByteBuffer& buffer) {
  Cursor cursor(buffer);
  uint64_t key, value;
  while (cursor.Varint(&key)) {
    const uint64_t field = key >> 3;
    if (field >= kFirstRequestField && field <= kLastRequestField) return field;
    bool skipped = false;
    switch (key & 7) {
      case kWireVarint:
        skipped = cursor.Varint(&value);
        break;
      case kWireFixed64:
        skipped = cursor.Skip(8);
        break;
      case kWireLengthDelimited:
        skipped = cursor.Varint(&value) && cursor.Skip(value);
        break;
      case kWireFixed32:
        skipped = cursor.Skip(4);
        break;
      default:  // groups (3, 4) are not in ext_proc's messages
        break;
    }
    if (!skipped) return 0;
  }
  return 0;
}

// One Process call, driven by the completion queue's thread: request a call, then read a
// request and write its reply until the client half-closes, then finish. The tag of every
// operation is the Call itself; `state_` says which operation completed.
class Call {
 public:
  Call(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq)
      : service_(service), cq_(cq), stream_(&ctx_) {
    service_->RequestCall(&ctx_, &stream_, cq_, cq_, this);
  }

  void Proceed(bool ok) {
    switch (state_) {
      case State::kRequested:
        if (!ok) {  // the server is shutting down
          delete this;
          return;
        }
        new Call(service_, cq_);  // the next client's call
        if (ctx_.method() != kMethod) {
          Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, ""));
          return;
        }
        Read();
        return;
      case State::kReading:
        if (!ok) {  // half-closed by the client, or cancelled (then Finish just completes)
          Finish(grpc::Status::OK);
          return;
        }
        Answer();
        return;
      case State::kWriting:
        if (!ok) {
          Finish(grpc::Status::CANCELLED);
          return;
        }
        Read();
        return;
      case State::kFinishing:
        delete this;
        return;
    }
  }

 private:
  enum class State { kRequested, kReading, kWriting, kFinishing };

  void Read() {
    state_ = State::kReading;
    stream_.Read(&in_, this);
  }

  void Answer() {
    const uint64_t field = RequestField(in_);
    if (field == 0) {  // nothing to answer, as the Python processor does
      Read();
      return;
    }
    grpc::Slice reply(kReplies[field - kFirstRequestField], 2, grpc::Slice::STATIC_SLICE);
    out_ = grpc::ByteBuffer(&reply, 1);
    state_ = State::kWriting;
    stream_.Write(out_, this);
  }

  void Finish(const grpc::Status& status) {
    state_ = State::kFinishing;
    stream_.Finish(status, this);
  }

  grpc::AsyncGenericService* service_;
  grpc::ServerCompletionQueue* cq_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer in_;
  grpc::ByteBuffer out_;
  State state_ = State::kRequested;
};

}  // namespace

int main(int argc, char** argv) {
  char* end = nullptr;
  const long port = argc == 2 ? std::strtol(argv[1], &end, 10) : 0;
  if (argc != 2 || *end != '\0' || port < 1 || port > 65535) {
    std::fprintf(stderr, "usage: cpp-processor PORT\n");
    return 2;
  }
  // Blocked before gRPC starts its threads, so they inherit the mask and sigwait gets them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:" + std::to_string(port),
                           grpc::InsecureServerCredentials());
  builder.RegisterAsyncGenericService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    std::fprintf(stderr, "cpp-processor: cannot listen on 127.0.0.1:%ld\n", port);
    return 1;
  }
  // Several calls requested ahead, so a burst of new streams need not wait for the thread.
  for (int i = 0; i < kCallsAhead; ++i) new Call(&service, cq.get());
  std::thread poller([&cq] {
    void* tag;
    bool ok;
    while (cq->Next(&tag, &ok)) static_cast<Call*>(tag)->Proceed(ok);
  });
  poller.detach();
  int signum = 0;
  sigwait(&stop, &signum);
  // Open streams get a second to end, then are cancelled. The poller still runs (it may
  // still finish calls), so the process ends here rather than unwinding the server under it.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  std::_Exit(0);
}
